"""Node benchmark: the ROS node against the bare engine, one frame at a time and as a stream.

One process, one model, one node. Two phases:

* alternating: for every frame the bare `Segmenter.segment` is timed, then the same frame goes
  through the node (published on `image` by a peer node, received back on each subscribed output),
  so that both see the same machine load. A frame is sent only after the previous one came back:
  per-frame latency without queueing. The ratio of the medians is the node's overhead over the
  engine (decode, copies, overlay, masks, messages, DDS) in the same run.
* streaming: the peer publishes frames at `rate` Hz for `duration` seconds regardless of the
  node, as a camera does. Reported: the input rate achieved, the output rate, the end-to-end
  latency (input stamp -> arrival of each output), and the drops: frames published that never
  came out on every output, with the node's own counters (received, replaced by a newer frame
  before the worker took it, processed) to say where they went.

Frames are matched to outputs by their header stamp.

    .venv/bin/ovseg bench --node --pretrained none --frames 20 --duration 10
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..bench import OtherCpuUse, format_machine, machine_info, percentile
from ..engine import Segmenter, SegmenterConfig
from ..engine.config import parameter_fields
from ..engine.segmenter import load_backbone
from ..samples import sample_images
from .demo import share_dir

DEFAULT_OUTPUTS = ("labels", "confidence", "overlay")


def config_parameters(cfg: SegmenterConfig) -> dict[str, Any]:
    """The node parameters (dotted names) that reproduce an engine config."""
    values: dict[str, Any] = {}
    for f in parameter_fields():
        key = f.metadata["key"]
        value = getattr(cfg, f.name)
        if key == "method_params":
            values.update({f"method_params.{k}": v for k, v in value.items()})
        else:
            values[key] = list(value) if isinstance(value, list | tuple) else value
    return values


def _frames(size: tuple[int, int], count: int) -> list[np.ndarray]:
    height, width = size
    photos = [rgb for _, rgb in sample_images()]
    return [
        np.ascontiguousarray(cv2.resize(photos[i % len(photos)], (width, height)))
        for i in range(count)
    ]


def _stats(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50": float("nan"), "p95": float("nan"), "mean": float("nan")}
    return {
        "p50": statistics.median(samples),
        "p95": percentile(samples, 95),
        "mean": statistics.fmean(samples),
    }


def _node_counters(node: Any) -> dict[str, int] | None:
    """The node's own counters for its (single) camera, None when they cannot be read."""
    try:
        name, cam = next(iter(node._cams.items()))
        slot = node._slots.stats[name]
        return {
            "received": int(slot.received),
            "dropped": int(slot.dropped),  # replaced by a newer frame before the worker took it
            "processed": int(slot.processed),
            "failed": int(slot.failed),
            "published": int(cam.stats.published),
        }
    except (AttributeError, KeyError, StopIteration, TypeError):
        return None


def _delta(after: dict[str, int] | None, before: dict[str, int] | None) -> dict[str, int] | None:
    if after is None or before is None:
        return None
    return {k: after[k] - before[k] for k in after}


def run_node_bench(
    cfg: SegmenterConfig,
    size: tuple[int, int] = (480, 640),
    frames: int = 10,
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS,
    backbone: Any = None,
    timeout: float = 120.0,
    duration: float = 0.0,
    rate: float = 30.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time `frames` frames through the engine and the node, alternating, then stream for
    `duration` seconds at `rate` Hz (0 = no streaming phase); see the module doc."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault(
        "FASTDDS_DEFAULT_PROFILES_FILE", str(share_dir() / "config" / "fastdds.xml")
    )
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from .codec import rgb_to_msg
    from .node import OvsegNode

    backbone = backbone or load_backbone(cfg)
    engine = Segmenter(cfg, backbone=backbone)
    images = _frames(size, frames + 1)
    context = Context()
    rclpy.init(
        context=context, domain_id=int(os.environ.get("ROS_DOMAIN_ID", 100 + os.getpid() % 100))
    )
    params = {k: v for k, v in config_parameters(cfg).items() if v != []}
    # The bench camera is reliable: subscribe reliable from the start (input.qos auto would
    # resubscribe once it sees the publisher, losing that frame).
    params["input.qos"] = "reliable"
    overrides = [Parameter(k, value=v) for k, v in params.items()]
    node = OvsegNode(context=context, parameter_overrides=overrides, backbone=backbone)
    peer = Node("bench_camera", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    executor.add_node(peer)
    reliable = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
    pub = peer.create_publisher(Image, "image", reliable)
    arrivals: dict[str, dict[int, float]] = {name: {} for name in outputs}

    def keeper(name: str):
        def keep(msg: Image) -> None:
            arrivals[name][msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec] = time.time()

        return keep

    for name in outputs:
        peer.create_subscription(Image, f"/ovseg/{name}", keeper(name), reliable)

    def spin_until(predicate, limit: float) -> bool:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if predicate():
                return True
            executor.spin_once(timeout_sec=0.1)
        return predicate()

    def stamp(msg: Image) -> int:
        """Stamp the message with the wall clock now; return the stamp in ns (the match key)."""
        sent = time.time_ns()
        msg.header.stamp.sec = sent // 10**9
        msg.header.stamp.nanosec = sent % 10**9
        return sent

    engine_ms: list[float] = []
    node_ms: dict[str, list[float]] = {name: [] for name in outputs}
    e2e_ms: list[float] = []
    stream: dict[str, Any] | None = None
    machine = machine_info()
    others = OtherCpuUse()
    try:
        if not spin_until(
            lambda: (
                pub.get_subscription_count() > 0
                and all(node.count_subscribers(f"/ovseg/{n}") > 0 for n in outputs)
            ),
            30.0,
        ):
            raise RuntimeError("the node and the bench camera did not discover each other")
        if progress:
            progress(f"node bench: {frames} frames one at a time (+1 warm-up)")
        for i, rgb in enumerate(images):
            t0 = time.perf_counter()
            engine.segment(rgb)
            engine_time = (time.perf_counter() - t0) * 1e3
            msg = rgb_to_msg(rgb, None)
            key = stamp(msg)
            pub.publish(msg)
            if not spin_until(lambda k=key: all(k in arrivals[n] for n in outputs), timeout):
                raise RuntimeError(f"frame {i} did not come back from the node within {timeout} s")
            if i == 0:
                continue  # warm-up: caches, first allocations
            engine_ms.append(engine_time)
            for name in outputs:
                node_ms[name].append((arrivals[name][key] * 1e9 - key) * 1e-6)
            e2e_ms.append((max(arrivals[n][key] for n in outputs) * 1e9 - key) * 1e-6)
        if duration > 0:
            if progress:
                progress(f"node bench: streaming at {rate:g} Hz for {duration:g} s")
            stream = _stream(
                node, peer, pub, images, arrivals, outputs, spin_until, stamp, duration, rate
            )
    finally:
        node.destroy_node()
        peer.destroy_node()
        executor.shutdown()
        context.try_shutdown()

    machine["other_processes_cpu_share"] = others.share()
    engine_stats = _stats(engine_ms)
    e2e_stats = _stats(e2e_ms)
    return {
        "machine": machine,
        "size": f"{size[1]}x{size[0]}",
        "frames": len(engine_ms),
        "model": f"{backbone.name} ({backbone.source}) on {backbone.device}",
        "method": cfg.method,
        "outputs": list(outputs),
        "engine_ms": engine_stats,
        "node_end_to_end_ms": e2e_stats,
        "node_per_output_ms": {n: _stats(v) for n, v in node_ms.items()},
        "overhead_ratio_p50": e2e_stats["p50"] / engine_stats["p50"] if engine_ms else None,
        "overhead_ms_p50": e2e_stats["p50"] - engine_stats["p50"] if engine_ms else None,
        "stream": stream,
    }


def _stream(
    node: Any,
    peer: Any,
    pub: Any,
    images: list[np.ndarray],
    arrivals: dict[str, dict[int, float]],
    outputs: tuple[str, ...],
    spin_until: Callable[[Callable[[], bool], float], bool],
    stamp: Callable[[Any], int],
    duration: float,
    rate: float,
) -> dict[str, Any]:
    """Publish at `rate` Hz for `duration` s from a timer, let the node finish, count."""
    from .codec import rgb_to_msg

    messages = [rgb_to_msg(rgb, None) for rgb in images[: max(1, min(len(images), 5))]]
    sent: list[int] = []  # stamps (ns) of the published frames, in order

    def tick() -> None:
        msg = messages[len(sent) % len(messages)]
        key = stamp(msg)
        pub.publish(msg)
        sent.append(key)

    # Counters are read while the worker is idle: a frame of the earlier phase still in hand
    # would otherwise count as processed in this phase without having been received in it.
    worker = getattr(node, "_worker", None)
    spin_until(lambda: worker is None or not worker.busy.is_set(), 10.0)
    before = _node_counters(node)
    timer = peer.create_timer(1.0 / rate, tick)
    start = time.monotonic()
    spin_until(lambda: time.monotonic() - start >= duration, duration + 5.0)
    timer.cancel()
    peer.destroy_timer(timer)
    published = len(sent)

    def complete() -> int:
        return sum(all(k in arrivals[n] for n in outputs) for k in sent)

    def settled() -> bool:
        # Everything the node received is accounted for (processed, replaced or failed), the
        # worker is idle and the outputs of every frame it published have arrived.
        delta = _delta(_node_counters(node), before)
        if delta is None:
            return False
        done = delta["processed"] + delta["dropped"] + delta["failed"]
        worker = getattr(node, "_worker", None)
        busy = worker is not None and worker.busy.is_set()
        return (
            delta["received"] >= published
            and done >= delta["received"]
            and not busy
            and complete() >= delta["published"]
        )

    # Drain: wait for the frame in hand (a few frame times at most); a frame lost on the way to
    # the node never settles the counters, so the wait is bounded.
    seen = [
        max(arrivals[n][k] for n in outputs) - k * 1e-9
        for k in sent
        if all(k in arrivals[n] for n in outputs)
    ]
    longest = max(seen, default=0.0)
    spin_until(settled, max(5.0, 3 * longest))
    drained = settled()
    after = _delta(_node_counters(node), before)

    done_keys = [k for k in sent if all(k in arrivals[n] for n in outputs)]
    per_output = {
        n: _stats([(arrivals[n][k] * 1e9 - k) * 1e-6 for k in sent if k in arrivals[n]])
        for n in outputs
    }
    last = [(max(arrivals[n][k] for n in outputs) * 1e9 - k) * 1e-6 for k in done_keys]
    span_in = (sent[-1] - sent[0]) * 1e-9 if published > 1 else 0.0
    finish = [max(arrivals[n][k] for n in outputs) for k in done_keys]
    span_out = (max(finish) - min(finish)) if len(finish) > 1 else 0.0
    return {
        "rate_hz": rate,
        "duration_s": duration,
        "published": published,
        "input_rate_hz": (published - 1) / span_in if span_in > 0 else 0.0,
        "outputs_complete": len(done_keys),
        "output_rate_hz": (len(done_keys) - 1) / span_out if span_out > 0 else 0.0,
        "per_output_count": {n: sum(k in arrivals[n] for k in sent) for n in outputs},
        "drops": published - len(done_keys),
        "drop_fraction": (published - len(done_keys)) / published if published else 0.0,
        "node_counters": after,
        "drained": drained,
        "node_per_output_ms": per_output,
        "node_end_to_end_ms": _stats(last),
    }


def format_node_bench(result: dict[str, Any]) -> str:
    """Markdown tables of a run_node_bench result (alternating, then streaming)."""
    lines = [
        f"Machine: {format_machine(result['machine'])}",
        "",
        f"Node vs engine, {result['size']}, {result['model']}, method {result['method']}, "
        f"{result['frames']} frames (alternating, one at a time)",
        "",
        "| path | p50 ms | p95 ms | mean ms |",
        "|---|---|---|---|",
    ]
    rows = [("engine: Segmenter.segment", result["engine_ms"])]
    rows += [
        (f"node: input stamp -> ~/{name}", stats)
        for name, stats in result["node_per_output_ms"].items()
    ]
    rows.append(("node: input stamp -> last output", result["node_end_to_end_ms"]))
    for label, s in rows:
        lines.append(f"| {label} | {s['p50']:.1f} | {s['p95']:.1f} | {s['mean']:.1f} |")
    if result["overhead_ratio_p50"] is not None:
        lines += [
            "",
            f"Node overhead over the engine: x{result['overhead_ratio_p50']:.3f} "
            f"({result['overhead_ms_p50']:+.1f} ms per frame, medians of the same run)",
        ]
    st = result.get("stream")
    if st:
        lines += [
            "",
            f"Streaming, {st['rate_hz']:g} Hz for {st['duration_s']:g} s: {st['published']} "
            f"frames published ({st['input_rate_hz']:.1f} Hz achieved), "
            f"{st['outputs_complete']} came out on every output "
            f"({st['output_rate_hz']:.2f} Hz), {st['drops']} dropped "
            f"({st['drop_fraction']:.0%})",
            "",
            "| stream: input stamp -> | frames | p50 ms | p95 ms | mean ms |",
            "|---|---|---|---|---|",
        ]
        for name, s in st["node_per_output_ms"].items():
            lines.append(
                f"| ~/{name} | {st['per_output_count'][name]} | {s['p50']:.1f} | "
                f"{s['p95']:.1f} | {s['mean']:.1f} |"
            )
        s = st["node_end_to_end_ms"]
        lines.append(
            f"| last output | {st['outputs_complete']} | {s['p50']:.1f} | {s['p95']:.1f} "
            f"| {s['mean']:.1f} |"
        )
        c = st["node_counters"]
        if c is not None:
            lost = st["published"] - c["received"]
            lines += [
                "",
                f"Node counters in the stream: received {c['received']} (lost on the way "
                f"{lost}), replaced by a newer frame before inference {c['dropped']}, "
                f"processed {c['processed']}, published {c['published']}, failed {c['failed']}"
                + ("" if st["drained"] else " (the node had not settled when the bench ended)"),
            ]
    return "\n".join(lines)


def write_node_outputs(
    result: dict[str, Any], out_dir: Path, command: str = "", date: str = ""
) -> dict[str, Path]:
    """Write node.json and node.md into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = date or time.strftime("%Y-%m-%d")
    paths = {"json": out_dir / "node.json", "md": out_dir / "node.md"}
    data = {"command": command, "date": date, **result}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    head = [f"# ovseg bench --node, {date}", ""] + ([f"`{command}`", ""] if command else [])
    paths["md"].write_text("\n".join(head) + format_node_bench(result) + "\n")
    return paths


__all__ = ["config_parameters", "format_node_bench", "run_node_bench", "write_node_outputs"]
