"""The node bench's floor: what DDS and rclpy alone cost for the node's traffic.

A relay node answers each input frame by publishing at once, on every output the bench times,
a message of the size the node's output has for that frame (labels and confidence mono8, the
overlay rgb8, all at the frame's size), built before the frame arrived and given the frame's
header. Its subscription and publishers have the node's QoS in the bench (reliable, depth 1) and
it spins in the session's executor thread, as the node does; the peer process times its round
trip exactly as the node's (bench_peer.py, `one`). So the node's overhead above this floor is the
node's own work: decoding, the hand-offs between its threads, computing and encoding its outputs.

bench_node_session.py loads this file by its path (also under `--against REV`, whose package may
not have it), so it imports nothing from ovseg_ros.
"""

from __future__ import annotations

import array
from typing import Any

#: The node's Image outputs the relay can stand for: (encoding, bytes per pixel).
ENCODINGS = {"labels": ("mono8", 1), "confidence": ("mono8", 1), "overlay": ("rgb8", 3)}


def relayable(outputs: tuple[str, ...]) -> bool:
    """Whether every output is one the relay can stand for."""
    return bool(outputs) and all(o in ENCODINGS for o in outputs)


class Relay:
    """A node that publishes prebuilt output-sized messages for every frame it receives."""

    def __init__(
        self, context: Any, name: str, size: tuple[int, int], outputs: tuple[str, ...]
    ) -> None:
        """Subscribe `/<name>_image`, publish `/<name>/<output>`; frames are height x width."""
        from rclpy.node import Node
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        if not relayable(outputs):
            raise ValueError(f"the relay stands for {sorted(ENCODINGS)} only, not {outputs}")
        qos = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST
        )
        height, width = size
        self.node = Node(name, context=context)
        self.input = f"/{name}_image"
        self.topics = [f"/{name}/{o}" for o in outputs]
        self._messages = []
        for output in outputs:
            encoding, channels = ENCODINGS[output]
            msg = Image(height=height, width=width, encoding=encoding, step=width * channels)
            data = array.array("B")
            data.frombytes(bytes(height * width * channels))
            msg.data = data  # as the node's encode.py assigns it: no per-byte check
            self._messages.append(msg)
        self._publishers = [self.node.create_publisher(Image, t, qos) for t in self.topics]
        self.relayed = 0
        self.node.create_subscription(Image, self.input, self._on_image, qos)

    def _on_image(self, msg: Any) -> None:
        for publisher, out in zip(self._publishers, self._messages, strict=True):
            out.header = msg.header
            publisher.publish(out)
        self.relayed += 1

    def destroy(self) -> None:
        """Destroy the relay's node."""
        self.node.destroy_node()


def start(session: Any) -> Relay | None:
    """A relay for a NodeSession's outputs in its executor, its topics matched by the session's
    peer (key "floor"); None when the outputs are not all ones it can stand for."""
    if not relayable(session.outputs):
        return None
    relay = Relay(session.context, "ovseg_floor", session.size, session.outputs)
    session.executor.add_node(relay.node)
    session.ask("open", key="floor", inputs=[relay.input], outputs=[relay.topics])
    if not session.wait_until(
        lambda: all(relay.node.count_subscribers(t) > 0 for t in relay.topics), 30.0
    ):
        raise RuntimeError("the floor's relay did not see the bench's subscribers")
    return relay
