"""The in-process node harness: the node under test and a peer node on one executor.

Used by test_node.py and test_node_hardening.py through the `harness` fixture of conftest.py.
"""

from __future__ import annotations

import time

import cv2
import numpy as np
from rcl_interfaces.srv import SetParameters
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rosutil import ros_context
from sensor_msgs.msg import Image

from ovseg_ros.ros.node import OvsegNode
from ovseg_ros.samples import sample_images

TINY = {
    "model.name": "ovseg-tiny",
    "model.pretrained": "none",
    "device": "cpu",
    "templates": "single",
    "text.cache_dir": "none",
}
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)


def sample_frame(width: int = 640, height: int = 480, index: int = 0) -> np.ndarray:
    """A real photo (scikit-image samples) resized to a camera-like size."""
    images = sample_images()
    rgb = images[index % len(images)][1]
    return np.ascontiguousarray(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA))


class Harness:
    """The node under test, a peer node (camera + listeners) and one executor for both."""

    def __init__(self, context, node: OvsegNode) -> None:
        self.context = context
        self.node = node
        self.peer = Node("peer", context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(node)
        self.executor.add_node(self.peer)
        self.seq = 0

    def publisher(self, topic: str, msg_type=Image, qos=qos_profile_sensor_data):
        return self.peer.create_publisher(msg_type, topic, qos)

    def collect(self, topic: str, msg_type=Image, qos=RELIABLE) -> list:
        """Subscribe and keep every message (with its arrival time on .arrived)."""
        received: list = []

        def keep(msg) -> None:
            received.append((time.monotonic(), msg))

        self.peer.create_subscription(msg_type, topic, keep, qos)
        return received

    def stamp(self, msg, frame_id: str = "camera_optical") -> None:
        """A unique, increasing stamp from the peer's clock."""
        self.seq += 1
        msg.header.stamp = self.peer.get_clock().now().to_msg()
        msg.header.frame_id = frame_id

    def stream(self, publish, until, timeout: float = 30.0, rate: float = 10.0) -> bool:
        """Call publish() at `rate` Hz while spinning, until until() holds or timeout."""
        deadline = time.monotonic() + timeout
        next_pub = 0.0
        while time.monotonic() < deadline:
            if until():
                return True
            now = time.monotonic()
            if publish is not None and now >= next_pub:
                publish()
                next_pub = now + 1.0 / rate
            self.executor.spin_once(timeout_sec=0.01)
        return bool(until())

    def spin_until(self, until, timeout: float = 30.0) -> bool:
        return self.stream(None, until, timeout)

    def call(self, client, request, timeout: float = 30.0):
        assert client.wait_for_service(timeout_sec=timeout)
        future = client.call_async(request)
        assert self.spin_until(future.done, timeout)
        return future.result()

    def set_parameters(self, *params: Parameter) -> list:
        """Through the node's SetParameters service, as ros2 param set does."""
        client = self.peer.create_client(SetParameters, "/ovseg/set_parameters")
        request = SetParameters.Request(parameters=[p.to_parameter_msg() for p in params])
        return self.call(client, request).results

    def wait_reconfigured(self, timeout: float = 30.0) -> None:
        assert self.spin_until(lambda: not self.node.reconfiguring(), timeout)

    def close(self) -> None:
        self.node.destroy_node()
        self.peer.destroy_node()
        self.executor.shutdown()


def harness_factory():
    """Generator for the `harness` fixture: harness(**parameters) starts a node (tiny model)."""
    made: list[Harness] = []
    stack = []

    def make(backbone=None, managed: bool = False, **params) -> Harness:
        """managed=True: the lifecycle node (unconfigured until a transition)."""
        ctx_manager = ros_context()
        context = ctx_manager.__enter__()
        stack.append(ctx_manager)
        values = {**TINY, **{k.replace("__", "."): v for k, v in params.items()}}
        overrides = [Parameter(k, value=v) for k, v in values.items()]
        node_class = OvsegNode
        if managed:
            from ovseg_ros.ros.lifecycle import OvsegLifecycleNode as node_class
        node = node_class(context=context, parameter_overrides=overrides, backbone=backbone)
        h = Harness(context, node)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
    for ctx_manager in reversed(stack):
        ctx_manager.__exit__(None, None, None)
