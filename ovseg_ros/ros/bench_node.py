"""Node benchmark: end-to-end latency through the ROS node against the bare engine, same run.

One process, one model: for every frame the bare `Segmenter.segment` is timed, then the same frame
goes through the node (published on `image` by a peer node, received back on each subscribed
output), alternating so that both see the same machine load. The frame is sent only after the
previous one came back, so the figures are per-frame latency without queueing. The ratio of the
medians is the node's overhead over the engine (decode, copies, overlay, masks, messages, DDS).

    .venv/bin/ovseg bench --node --pretrained none --frames 20
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import cv2
import numpy as np

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
    ordered = sorted(samples)
    return {
        "p50": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "mean": statistics.fmean(ordered),
    }


def run_node_bench(
    cfg: SegmenterConfig,
    size: tuple[int, int] = (480, 640),
    frames: int = 10,
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS,
    backbone: Any = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Time `frames` frames through the engine and through the node, alternating; see module doc."""
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
    # The bench camera is reliable and sends one frame at a time: subscribe reliable from the
    # start (input.qos auto would resubscribe once it sees the publisher, losing that frame).
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

    engine_ms: list[float] = []
    node_ms: dict[str, list[float]] = {name: [] for name in outputs}
    e2e_ms: list[float] = []
    try:
        if not spin_until(
            lambda: (
                pub.get_subscription_count() > 0
                and all(node.count_subscribers(f"/ovseg/{n}") > 0 for n in outputs)
            ),
            30.0,
        ):
            raise RuntimeError("the node and the bench camera did not discover each other")
        for i, rgb in enumerate(images):
            t0 = time.perf_counter()
            engine.segment(rgb)
            engine_time = (time.perf_counter() - t0) * 1e3
            msg = rgb_to_msg(rgb, None)
            sent = time.time()
            msg.header.stamp.sec = int(sent)
            msg.header.stamp.nanosec = int((sent % 1) * 1e9)
            key = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
            pub.publish(msg)
            if not spin_until(lambda k=key: all(k in arrivals[n] for n in outputs), timeout):
                raise RuntimeError(f"frame {i} did not come back from the node within {timeout} s")
            if i == 0:
                continue  # warm-up: caches, first allocations
            engine_ms.append(engine_time)
            stamp = key * 1e-9
            for name in outputs:
                node_ms[name].append((arrivals[name][key] - stamp) * 1e3)
            e2e_ms.append((max(arrivals[n][key] for n in outputs) - stamp) * 1e3)
    finally:
        node.destroy_node()
        peer.destroy_node()
        executor.shutdown()
        context.try_shutdown()

    engine_stats = _stats(engine_ms)
    e2e_stats = _stats(e2e_ms)
    return {
        "size": f"{size[1]}x{size[0]}",
        "frames": len(engine_ms),
        "model": f"{backbone.name} ({backbone.source}) on {backbone.device}",
        "method": cfg.method,
        "outputs": list(outputs),
        "engine_ms": engine_stats,
        "node_end_to_end_ms": e2e_stats,
        "node_per_output_ms": {n: _stats(v) for n, v in node_ms.items()},
        "overhead_ratio_p50": e2e_stats["p50"] / engine_stats["p50"],
        "overhead_ms_p50": e2e_stats["p50"] - engine_stats["p50"],
    }


def format_node_bench(result: dict[str, Any]) -> str:
    """Markdown table of a run_node_bench result."""
    lines = [
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
    lines += [
        "",
        f"Node overhead over the engine: x{result['overhead_ratio_p50']:.3f} "
        f"(+{result['overhead_ms_p50']:.1f} ms per frame, medians of the same run)",
    ]
    return "\n".join(lines)


__all__ = ["config_parameters", "format_node_bench", "run_node_bench"]
