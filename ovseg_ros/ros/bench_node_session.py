"""One node-bench session: a bare engine and OvsegNodes on one backbone, driven by a peer camera.

Used in-process by `ovseg bench --node` (bench_node.py) and, for `--against REV`, run as a script
in a worker process under another checkout's code: this file's measuring logic then drives that
revision's node. So it imports only what every revision of the package has had (OvsegNode with
its _cams / _slots / _worker counters, Segmenter, SegmenterConfig, parameter_fields,
sample_images, demo.share_dir) and no other module of the bench.

The nodes spin in an executor thread of this process, as under `ros2 run`. The cameras and the
subscribers of the outputs are a peer process (bench_peer.py, always this checkout's file and
code), as a camera driver and RViz are: receiving ~1.5 MB of outputs a frame in the node's
process would compete with the node's threads for the GIL.

Phases:
* alternate(frames): per frame, the bare Segmenter.segment is timed, then the same frame goes
  through the node (published by the peer, received back on every output) before the next one:
  latency without queueing, engine and node under the same machine load. Then through a relay
  node (bench_relay.py) that answers with prebuilt messages of the outputs' sizes: the DDS and
  rclpy floor of that traffic, so the node's own work shows apart.
* stream(duration, rate, cameras): the peer publishes at `rate` Hz to each of `cameras` cameras
  of one node, regardless of the node, as cameras do; arrivals are matched to frames by stamp.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

DEFAULT_OUTPUTS = ("labels", "confidence", "overlay")
FRAMES = 8  # distinct images the peer cycles through (the session prepares the same)


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


class NodeSession:
    """A context with one node per camera count (made on first use) and the peer process."""

    def __init__(
        self,
        cfg: Any,
        size: tuple[int, int],
        outputs: tuple[str, ...] = DEFAULT_OUTPUTS,
        backbone: Any = None,
        timeout: float = 120.0,
        stand_in_ms: float = 0.0,
        stand_in_batch_ms: float | None = None,
    ) -> None:
        """Load the model once (or reuse `backbone`); start ROS and the peer on one domain.

        stand_in_ms > 0: the engine (the bare one and the nodes') is replaced by a stand-in that
        waits that long without using the CPU, as a GPU run does, and returns the real engine's
        result for the frame, computed once beforehand: what is left is the node's own work. A
        pass over n frames (cameras batched, as the node does on a GPU) waits stand_in_ms +
        (n - 1) * stand_in_batch_ms (default stand_in_ms / 4).
        """
        from ovseg_ros.ros.demo import share_dir

        os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        os.environ.setdefault(
            "FASTDDS_DEFAULT_PROFILES_FILE", str(share_dir() / "config" / "fastdds.xml")
        )
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        from ovseg_ros.engine import Segmenter
        from ovseg_ros.engine.segmenter import load_backbone

        self.cfg, self.size, self.outputs, self.timeout = cfg, size, outputs, timeout
        self.backbone = backbone or load_backbone(cfg)
        self.engine = Segmenter(cfg, backbone=self.backbone)
        self.stand_in_ms = stand_in_ms
        self.stand_in_batch_ms = stand_in_ms / 4 if stand_in_batch_ms is None else stand_in_batch_ms
        self._results: dict[Any, Any] = {}  # frame key -> the real engine's result (stand-in)
        self.context = Context()
        self.domain = int(os.environ.get("ROS_DOMAIN_ID", 100 + os.getpid() % 100))
        rclpy.init(context=self.context, domain_id=self.domain)
        # The nodes spin in a thread of their own, as in `ros2 run`; the peer is a process.
        self.executor = SingleThreadedExecutor(context=self.context)
        self._spinner = threading.Thread(target=self._spin, name="bench-executor", daemon=True)
        self._spinner.start()
        self._peer = self._start_peer()
        self._nodes: dict[int, tuple[Any, list[list[str]]]] = {}
        self._relay: Any = None  # bench_relay.Relay, made on first use (False: not for these)

    # --- plumbing ------------------------------------------------------------------------------

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def _start_peer(self) -> Any:
        """bench_peer.py (beside this file) with this checkout's code, on this domain."""
        import subprocess
        from pathlib import Path

        here = Path(__file__).resolve()
        env = {
            **os.environ,
            "ROS_DOMAIN_ID": str(self.domain),
            "PYTHONPATH": str(here.parents[2]),
        }
        proc = subprocess.Popen(
            [sys.executable, str(here.with_name("bench_peer.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdin and proc.stdout
        proc.stdin.write(json.dumps({"size": list(self.size)}) + "\n")
        proc.stdin.flush()
        if not proc.stdout.readline().startswith('{"ready"'):
            proc.kill()
            raise RuntimeError("the bench's peer process did not start")
        return proc

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        """One command to the peer process (bench_peer.py); its answer."""
        self._peer.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._peer.stdin.flush()
        line = self._peer.stdout.readline()
        if not line:
            raise RuntimeError(f"the bench's peer process ended during {op!r}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"bench peer, {op}: {answer['error']}")
        return answer

    @staticmethod
    def wait_until(predicate: Callable[[], bool], limit: float) -> bool:
        """Poll predicate() (the executor spins in its own thread) for up to `limit` s."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.005)
        return predicate()

    def node(self, cameras: int = 1) -> tuple[Any, list[list[str]]]:
        """(node, the output topics per camera); the peer's publishers and subscriptions matched."""
        if cameras in self._nodes:
            return self._nodes[cameras]
        from rclpy.parameter import Parameter

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
        if self.stand_in_ms > 0:
            node.segmenter.segment = self.segment  # the node's own work, around a stand-in
            node.segmenter.segment_batch = self.segment_batch
            worker = getattr(node, "_worker", None)
            if hasattr(worker, "batch"):
                worker.batch = True  # the stand-in is a GPU: the node batches cameras there
        self.executor.add_node(node)
        prefixes = [f"{c}/" for c in names] or [""]
        topics = [[f"/{name}/{p}{o}" for o in self.outputs] for p in prefixes]
        self.ask("open", key=name, inputs=[f"/{p}image" for p in prefixes], outputs=topics)
        if not self.wait_until(
            lambda: all(node.count_subscribers(t) > 0 for ts in topics for t in ts), 30.0
        ):
            raise RuntimeError("the node did not see the bench's subscribers")
        self._nodes[cameras] = (node, topics)
        return self._nodes[cameras]

    def relay(self) -> Any:
        """The floor's relay node (bench_relay.py, loaded by its path: REV's package may lack
        it), made on first use; None when it cannot stand for these outputs."""
        if self._relay is None:
            import importlib.util
            from pathlib import Path

            path = Path(__file__).resolve().with_name("bench_relay.py")
            spec = importlib.util.spec_from_file_location("ovseg_bench_relay", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self._relay = module.start(self) or False
        return self._relay or None

    def close(self) -> None:
        """End the peer, destroy the nodes and end the context."""
        try:
            self._peer.stdin.close()
            self._peer.wait(30)
        except Exception:  # noqa: BLE001 - closing: end it regardless
            self._peer.kill()
        for node, _ in self._nodes.values():
            self.executor.remove_node(node)
            node.destroy_node()
        if self._relay:
            self.executor.remove_node(self._relay.node)
            self._relay.destroy()
        self.executor.shutdown()
        self.context.try_shutdown()
        self._spinner.join(10)

    # --- phases --------------------------------------------------------------------------------

    @staticmethod
    def _key(rgb: np.ndarray) -> Any:
        return rgb.shape, hash(np.ascontiguousarray(rgb[::7, ::5]).tobytes())

    def prepare(self, images: list[np.ndarray]) -> None:
        """With a stand-in engine: compute the real results of these frames now, untimed."""
        if self.stand_in_ms > 0:
            for rgb in images:
                self._results.setdefault(self._key(rgb), self.engine.segment(rgb))

    def _result(self, rgb: np.ndarray) -> Any:
        result = self._results.get(self._key(rgb))
        if result is None:  # a frame not prepared: computed once, outside the stand-in's time
            result = self._results[self._key(rgb)] = self.engine.segment(rgb)
        return result

    def segment(self, rgb: np.ndarray) -> Any:
        """The engine as the bench and the nodes call it (the stand-in when one is set)."""
        if self.stand_in_ms <= 0:
            return self.engine.segment(rgb)
        result = self._result(rgb)
        time.sleep(self.stand_in_ms / 1e3)
        return result

    def segment_batch(self, images: list[np.ndarray]) -> list[Any]:
        """The stand-in's pass over several cameras' frames (stand_in_batch_ms per extra frame)."""
        results = [self._result(rgb) for rgb in images]
        time.sleep((self.stand_in_ms + (len(images) - 1) * self.stand_in_batch_ms) / 1e3)
        return results

    def alternate(self, frames: int, warmup: int = 1) -> dict[str, Any]:
        """Engine, then node, frame by frame (see the module doc); samples in ms."""
        from ovseg_ros.viz import class_colors, overlay

        try:  # the node's own overlay call (its outputs module has one since it passes counts)
            from ovseg_ros.ros.outputs import overlay_image
        except ImportError:  # an older revision's node called overlay() as below
            overlay_image = None

        node, topics = self.node(1)
        relay = self.relay()
        images = bench_frames(self.size, FRAMES)
        self.prepare(images)
        samples: dict[str, Any] = {"engine": [], "end_to_end": [], "overlay": [], "outputs": {}}
        samples["relay"] = []
        samples["outputs"] = {o: [] for o in self.outputs}
        for i in range(frames + warmup):
            rgb = images[i % FRAMES]
            t0 = time.perf_counter()
            result = self.segment(rgb)
            engine_ms = (time.perf_counter() - t0) * 1e3
            # The overlay as the node draws it (0.5 is the default publish.overlay_alpha): what
            # the node's overhead is allowed besides its own work.
            names = result.vocabulary.names
            t0 = time.perf_counter()
            if overlay_image is not None:
                overlay_image(rgb, result, 0.5)
            else:
                overlay(rgb, result.labels, class_colors(max(len(names), 1)), 0.5, names)
            overlay_ms = (time.perf_counter() - t0) * 1e3
            got = self.ask("one", key=node.get_name(), camera=0, frame=i, timeout=self.timeout)
            floor = relay and self.ask("one", key="floor", camera=0, frame=i, timeout=self.timeout)
            if i < warmup:
                continue  # caches, first allocations
            if floor:
                samples["relay"].append(max(floor["outputs"]))
            samples["engine"].append(engine_ms)
            samples["overlay"].append(overlay_ms)
            for o, ms in zip(self.outputs, got["outputs"], strict=True):
                samples["outputs"][o].append(ms)
            samples["end_to_end"].append(max(got["outputs"]))
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
        """The peer publishes at `rate` Hz to every camera for `duration` s; the node finishes."""
        node, topics = self.node(cameras)
        self.prepare(bench_frames(self.size, FRAMES))

        def idle() -> bool:
            worker = getattr(node, "_worker", None)
            return worker is None or not worker.busy.is_set()

        # Counters are read while the node is idle: a frame of an earlier phase still in hand
        # would otherwise count as processed in this phase without having been received in it.
        self.wait_until(idle, 10.0)
        before = self.counters(node)
        batches = int(getattr(getattr(node, "_worker", None), "batches", 0))
        streamed = self.ask("stream", key=node.get_name(), duration=duration, rate=rate)
        sent = [(int(c), int(k)) for c, k in streamed["sent"]]

        def delta() -> dict[str, int]:
            after = self.counters(node)
            return {k: after[k] - before[k] for k in after}

        def node_settled() -> bool:
            # All the node received is accounted for and it is idle.
            d = delta()
            return (
                d["received"] >= len(sent)
                and d["processed"] + d["dropped"] + d["failed"] >= d["received"]
                and idle()
            )

        self.wait_until(node_settled, 10.0)
        published = delta()["published"]
        got = self.ask("collect", key=node.get_name(), published=published, limit=10.0)
        arrivals = {t: {int(k): v for k, v in a.items()} for t, a in got["arrivals"].items()}

        def complete(cam: int, key: int) -> bool:
            return all(key in arrivals[t] for t in topics[cam])

        done = [(c, k) for c, k in sent if complete(c, k)]
        finish = [max(arrivals[t][k] for t in topics[c]) for c, k in done]
        last = [(f * 1e9 - k) * 1e-6 for f, (_, k) in zip(finish, done, strict=True)]
        per_output = {
            o: [
                (arrivals[topics[c][j]][k] * 1e9 - k) * 1e-6
                for c, k in sent
                if k in arrivals[topics[c][j]]
            ]
            for j, o in enumerate(self.outputs)
        }
        stamps = [k for _, k in sent]
        ticks = int(streamed["ticks"])
        return {
            "rate_hz": rate,
            "duration_s": duration,
            "cameras": cameras,
            "published": len(sent),
            # Rates are intervals over spans, so that rounds of a phase can be added up.
            "input_intervals": max(0, ticks - 1),
            "input_span_s": (max(stamps) - min(stamps)) * 1e-9 if len(stamps) > 1 else 0.0,
            "outputs_complete": len(done),
            "output_intervals": max(0, len(done) - 1),
            "output_span_s": (max(finish) - min(finish)) if len(finish) > 1 else 0.0,
            "per_output_count": {o: len(v) for o, v in per_output.items()},
            "drops": len(sent) - len(done),
            "node_counters": delta(),
            "drained": node_settled() and len(done) >= published,
            "end_to_end": last,
            "outputs": per_output,
            # forward passes that served more than one camera's frame
            "batches": int(getattr(getattr(node, "_worker", None), "batches", 0)) - batches,
        }


def _worker(stdin: Any = sys.stdin, stdout: Any = sys.stdout) -> None:
    """`--against`: read a session spec, then phase commands, one JSON line each; answer each."""
    from ovseg_ros.engine import SegmenterConfig

    spec = json.loads(stdin.readline())
    cfg = SegmenterConfig(**spec["config"])
    session = NodeSession(
        cfg,
        tuple(spec["size"]),
        tuple(spec["outputs"]),
        stand_in_ms=spec.get("stand_in_ms", 0),
        stand_in_batch_ms=spec.get("stand_in_batch_ms"),
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
