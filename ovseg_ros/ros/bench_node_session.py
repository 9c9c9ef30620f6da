"""One node-bench session: a bare engine and OvsegNodes on one backbone, driven by a peer camera.

Used in-process by `ovseg bench --node` (bench_node.py) and, for `--against REV`, run as a script
in a worker process under another checkout's code: this file's measuring logic then drives that
revision's node. So it imports only what every revision of the package has had (OvsegNode with
its _cams / _slots / _worker counters, Segmenter, SegmenterConfig, parameter_fields, rgb_to_msg,
sample_images, demo.share_dir, the rgb8 encoder) and no other module of the bench.

Phases:
* alternate(frames): per frame, the bare Segmenter.segment is timed, then the same frame goes
  through the node (published by the peer, received back on every output) before the next one:
  latency without queueing, engine and node under the same machine load.
* stream(duration, rate, cameras): the peer publishes at `rate` Hz to each of `cameras` cameras
  of one node, regardless of the node, as cameras do; arrivals are matched to frames by stamp.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

DEFAULT_OUTPUTS = ("labels", "confidence", "overlay")


def config_parameters(cfg: Any) -> dict[str, Any]:
    """The node parameters (dotted names) that reproduce an engine config."""
    from ovseg_ros.engine.config import parameter_fields

    values: dict[str, Any] = {}
    for f in parameter_fields():
        key = f.metadata["key"]
        value = getattr(cfg, f.name)
        if key == "method_params":
            values.update({f"method_params.{k}": v for k, v in value.items()})
        else:
            values[key] = list(value) if isinstance(value, list | tuple) else value
    return values


def bench_frames(size: tuple[int, int], count: int) -> list[np.ndarray]:
    """`count` sample photos resized to (height, width): the same frames in every process."""
    from ovseg_ros.samples import sample_images

    height, width = size
    photos = [rgb for _, rgb in sample_images()]
    return [
        np.ascontiguousarray(cv2.resize(photos[i % len(photos)], (width, height)))
        for i in range(count)
    ]


def _rgb_to_msg() -> Callable[..., Any]:
    """The encoder of rgb8 Image messages (ros/encode.py; ros/codec.py in older revisions)."""
    try:
        from ovseg_ros.ros.encode import rgb_to_msg
    except ImportError:  # a revision before the codec split
        from ovseg_ros.ros.codec import rgb_to_msg
    return rgb_to_msg


class NodeSession:
    """A context with the peer camera and (made on first use) one node per camera count."""

    def __init__(
        self,
        cfg: Any,
        size: tuple[int, int],
        outputs: tuple[str, ...] = DEFAULT_OUTPUTS,
        backbone: Any = None,
        timeout: float = 120.0,
        stand_in_ms: float = 0.0,
    ) -> None:
        """Load the model once (or reuse `backbone`); start ROS on this process's domain.

        stand_in_ms > 0: the engine (the bare one and the nodes') is replaced by a stand-in that
        waits that long without using the CPU, as a GPU run does, and returns the real engine's
        result for the frame, computed once beforehand: what is left is the node's own work.
        """
        from ovseg_ros.ros.demo import share_dir

        os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        os.environ.setdefault(
            "FASTDDS_DEFAULT_PROFILES_FILE", str(share_dir() / "config" / "fastdds.xml")
        )
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node

        from ovseg_ros.engine import Segmenter
        from ovseg_ros.engine.segmenter import load_backbone

        self.cfg, self.size, self.outputs, self.timeout = cfg, size, outputs, timeout
        self.backbone = backbone or load_backbone(cfg)
        self.engine = Segmenter(cfg, backbone=self.backbone)
        self.stand_in_ms = stand_in_ms
        self._results: dict[Any, Any] = {}  # frame key -> the real engine's result (stand-in)
        self.context = Context()
        domain = int(os.environ.get("ROS_DOMAIN_ID", 100 + os.getpid() % 100))
        rclpy.init(context=self.context, domain_id=domain)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.peer = Node("bench_camera", context=self.context)
        self.executor.add_node(self.peer)
        self.arrivals: dict[str, dict[int, float]] = {}  # output topic -> stamp -> arrival
        self._nodes: dict[int, tuple[Any, list[Any], list[list[str]]]] = {}

    # --- plumbing ------------------------------------------------------------------------------

    def spin_until(self, predicate: Callable[[], bool], limit: float) -> bool:
        """Spin the executor until predicate() or `limit` seconds."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if predicate():
                return True
            self.executor.spin_once(timeout_sec=0.1)
        return predicate()

    @staticmethod
    def stamp(msg: Any) -> int:
        """Stamp the message with the wall clock now; return the stamp in ns (the match key)."""
        sent = time.time_ns()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(sent, 10**9)
        return sent

    def node(self, cameras: int = 1) -> tuple[Any, list[Any], list[list[str]]]:
        """(node, the peer's image publisher per camera, the output topics per camera)."""
        if cameras in self._nodes:
            return self._nodes[cameras]
        from rclpy.parameter import Parameter
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        from ovseg_ros.ros.node import OvsegNode

        name = f"ovseg_{cameras}cam"
        names = [f"{name}_cam{i}" for i in range(cameras)] if cameras > 1 else []
        params = {k: v for k, v in config_parameters(self.cfg).items() if v != []}
        # The bench camera is reliable: subscribe reliable from the start (input.qos auto would
        # resubscribe once it sees the publisher, losing that frame).
        params["input.qos"] = "reliable"
        if names:
            params["cameras"] = names
        node = OvsegNode(
            context=self.context,
            node_name=name,
            parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
            backbone=self.backbone,
        )
        self.executor.add_node(node)
        if self.stand_in_ms > 0:
            node.segmenter.segment = self.segment  # the node's own work, around a stand-in
        reliable = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        prefixes = [f"{c}/" for c in names] or [""]
        pubs = [self.peer.create_publisher(Image, f"/{p}image", reliable) for p in prefixes]
        topics = [[f"/{name}/{p}{o}" for o in self.outputs] for p in prefixes]
        for topic in (t for per_camera in topics for t in per_camera):
            self.arrivals[topic] = {}
            self.peer.create_subscription(Image, topic, self._keeper(topic), reliable)
        if not self.spin_until(
            lambda: (
                all(p.get_subscription_count() > 0 for p in pubs)
                and all(node.count_subscribers(t) > 0 for ts in topics for t in ts)
            ),
            30.0,
        ):
            raise RuntimeError("the node and the bench camera did not discover each other")
        self._nodes[cameras] = (node, pubs, topics)
        return self._nodes[cameras]

    def _keeper(self, topic: str) -> Callable[[Any], None]:
        arrivals = self.arrivals[topic]

        def keep(msg: Any) -> None:
            arrivals[msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec] = time.time()

        return keep

    def close(self) -> None:
        """Destroy the nodes and end the context."""
        for node, _, _ in self._nodes.values():
            node.destroy_node()
        self.peer.destroy_node()
        self.executor.shutdown()
        self.context.try_shutdown()

    # --- phases --------------------------------------------------------------------------------

    @staticmethod
    def _key(rgb: np.ndarray) -> Any:
        return rgb.shape, hash(np.ascontiguousarray(rgb[::7, ::5]).tobytes())

    def prepare(self, images: list[np.ndarray]) -> None:
        """With a stand-in engine: compute the real results of these frames now, untimed."""
        if self.stand_in_ms > 0:
            for rgb in images:
                self._results.setdefault(self._key(rgb), self.engine.segment(rgb))

    def segment(self, rgb: np.ndarray) -> Any:
        """The engine as the bench and the nodes call it (the stand-in when one is set)."""
        if self.stand_in_ms <= 0:
            return self.engine.segment(rgb)
        result = self._results.get(self._key(rgb))
        if result is None:  # a frame not prepared: computed once, outside the stand-in's time
            result = self._results[self._key(rgb)] = self.engine.segment(rgb)
        time.sleep(self.stand_in_ms / 1e3)
        return result

    def alternate(self, frames: int, warmup: int = 1) -> dict[str, Any]:
        """Engine, then node, frame by frame (see the module doc); samples in ms."""
        from ovseg_ros.viz import class_colors, overlay

        node, pubs, topics = self.node(1)
        images = bench_frames(self.size, frames + warmup)
        self.prepare(images)
        samples: dict[str, Any] = {"engine": [], "end_to_end": [], "overlay": [], "outputs": {}}
        samples["outputs"] = {o: [] for o in self.outputs}
        for i, rgb in enumerate(images):
            t0 = time.perf_counter()
            result = self.segment(rgb)
            engine_ms = (time.perf_counter() - t0) * 1e3
            # The overlay as the node draws it (0.5 is the default publish.overlay_alpha): what
            # the node's overhead is allowed besides its own work.
            names = result.vocabulary.names
            t0 = time.perf_counter()
            overlay(rgb, result.labels, class_colors(max(len(names), 1)), 0.5, names)
            overlay_ms = (time.perf_counter() - t0) * 1e3
            msg = _rgb_to_msg()(rgb, None)
            key = self.stamp(msg)
            pubs[0].publish(msg)
            if not self.spin_until(
                lambda k=key: all(k in self.arrivals[t] for t in topics[0]), self.timeout
            ):
                raise RuntimeError(f"frame {i} did not come back within {self.timeout} s")
            if i < warmup:
                continue  # caches, first allocations
            samples["engine"].append(engine_ms)
            samples["overlay"].append(overlay_ms)
            got = {
                o: (self.arrivals[t][key] * 1e9 - key) * 1e-6
                for o, t in zip(self.outputs, topics[0], strict=True)
            }
            for o, ms in got.items():
                samples["outputs"][o].append(ms)
            samples["end_to_end"].append(max(got.values()))
        return samples

    def counters(self, node: Any) -> dict[str, int]:
        """The node's counters summed over its cameras."""
        total = dict.fromkeys(("received", "dropped", "processed", "failed", "published"), 0)
        for name, cam in node._cams.items():
            slot = node._slots.stats[name]
            for key in ("received", "dropped", "processed", "failed"):
                total[key] += int(getattr(slot, key))
            total["published"] += int(cam.stats.published)
        return total

    def stream(self, duration: float, rate: float, cameras: int = 1) -> dict[str, Any]:
        """Publish at `rate` Hz to every camera for `duration` s, let the node finish, count."""
        node, pubs, topics = self.node(cameras)
        images = bench_frames(self.size, 5)
        self.prepare(images)
        messages = [[_rgb_to_msg()(rgb, None) for rgb in images] for _ in pubs]
        sent: list[tuple[int, int]] = []  # (camera, stamp)
        ticks = [0]

        def tick() -> None:
            for cam, pub in enumerate(pubs):
                msg = messages[cam][ticks[0] % len(images)]
                sent.append((cam, self.stamp(msg)))
                pub.publish(msg)
            ticks[0] += 1

        def idle() -> bool:
            worker = getattr(node, "_worker", None)
            return worker is None or not worker.busy.is_set()

        # Counters are read while the node is idle: a frame of an earlier phase still in hand
        # would otherwise count as processed in this phase without having been received in it.
        self.spin_until(idle, 10.0)
        before = self.counters(node)
        timer = self.peer.create_timer(1.0 / rate, tick)
        start = time.monotonic()
        self.spin_until(lambda: time.monotonic() - start >= duration, duration + 5.0)
        timer.cancel()
        self.peer.destroy_timer(timer)

        def complete(cam: int, key: int) -> bool:
            return all(key in self.arrivals[t] for t in topics[cam])

        def delta() -> dict[str, int]:
            after = self.counters(node)
            return {k: after[k] - before[k] for k in after}

        def settled() -> bool:
            # All the node received is accounted for, it is idle, and every frame it published
            # has arrived on every output.
            d = delta()
            done = d["processed"] + d["dropped"] + d["failed"]
            arrived = sum(complete(c, k) for c, k in sent)
            return (
                d["received"] >= len(sent)
                and done >= d["received"]
                and idle()
                and (arrived >= d["published"])
            )

        self.spin_until(settled, 10.0)
        done = [(c, k) for c, k in sent if complete(c, k)]
        finish = [max(self.arrivals[t][k] for t in topics[c]) for c, k in done]
        last = [(f * 1e9 - k) * 1e-6 for f, (_, k) in zip(finish, done, strict=True)]
        per_output = {
            o: [
                (self.arrivals[topics[c][j]][k] * 1e9 - k) * 1e-6
                for c, k in sent
                if k in self.arrivals[topics[c][j]]
            ]
            for j, o in enumerate(self.outputs)
        }
        stamps = [k for _, k in sent]
        return {
            "rate_hz": rate,
            "duration_s": duration,
            "cameras": cameras,
            "published": len(sent),
            # Rates are intervals over spans, so that rounds of a phase can be added up.
            "input_intervals": max(0, ticks[0] - 1),
            "input_span_s": (max(stamps) - min(stamps)) * 1e-9 if len(stamps) > 1 else 0.0,
            "outputs_complete": len(done),
            "output_intervals": max(0, len(done) - 1),
            "output_span_s": (max(finish) - min(finish)) if len(finish) > 1 else 0.0,
            "per_output_count": {o: len(v) for o, v in per_output.items()},
            "drops": len(sent) - len(done),
            "node_counters": delta(),
            "drained": settled(),
            "end_to_end": last,
            "outputs": per_output,
        }


def _worker(stdin: Any = sys.stdin, stdout: Any = sys.stdout) -> None:
    """`--against`: read a session spec, then phase commands, one JSON line each; answer each."""
    from ovseg_ros.engine import SegmenterConfig

    spec = json.loads(stdin.readline())
    cfg = SegmenterConfig(**spec["config"])
    session = NodeSession(
        cfg, tuple(spec["size"]), tuple(spec["outputs"]), stand_in_ms=spec.get("stand_in_ms", 0)
    )
    try:
        session.node(1)
        print(json.dumps({"ready": True}), file=stdout, flush=True)
        for line in stdin:
            command = json.loads(line)
            phase = command.pop("phase")
            result = getattr(session, phase)(**command)
            print(json.dumps(result), file=stdout, flush=True)
    finally:
        session.close()


if __name__ == "__main__":
    _worker()
