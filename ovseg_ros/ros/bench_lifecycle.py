"""Memory of the lifecycle node in each state: `python -m ovseg_ros.ros.bench_lifecycle`.

Starts `ovseg_lifecycle_node` in this process (DDS on localhost, a domain of its own), streams
camera frames into it from a peer node while it is active, and after each transition reports
the process's resident memory (RSS), the bytes of tensors the node still holds (model
parameters and buffers), and on CUDA the allocated and reserved GPU memory:

    unconfigured -> configure (inactive) -> activate + frames (active) -> deactivate (inactive)
    -> cleanup (unconfigured)

    python -m ovseg_ros.ros.bench_lifecycle --model ViT-B-16 --frames 10 --size 640x480
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

#: A domain of its own so that nothing else on the machine sees (or disturbs) the run.
DOMAIN_ID = 87


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def held_tensor_mb(node: Any) -> float:
    """MB of model parameters and buffers the node holds (0 when it holds no model)."""
    segmenter = getattr(node, "segmenter", None)
    if segmenter is None or segmenter.backbone is None:
        return 0.0
    model = segmenter.backbone.model
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def gpu_mb() -> tuple[float, float]:
    """(allocated, reserved) CUDA memory in MB; zeros without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0.0, 0.0
    return torch.cuda.memory_allocated() / 2**20, torch.cuda.memory_reserved() / 2**20


def measure(
    model: str,
    device: str,
    frames: int,
    width: int,
    height: int,
    timeout: float = 300.0,
    domain_id: int = DOMAIN_ID,
) -> list[dict[str, Any]]:
    """Go through the transitions; one row (state, RSS, held tensors, GPU) after each."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from .encode import rgb_to_msg
    from .lifecycle import SUCCESS, OvsegLifecycleNode

    context = Context()
    rclpy.init(context=context, domain_id=domain_id)
    values = {
        "model.name": model,
        "model.pretrained": "none",
        "device": device,
        "templates": "single",
        "text.cache_dir": "none",
    }
    node = OvsegLifecycleNode(
        context=context, parameter_overrides=[Parameter(k, value=v) for k, v in values.items()]
    )
    peer = rclpy.create_node("bench_lifecycle_camera", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    executor.add_node(peer)
    got: list[Any] = []
    peer.create_subscription(Image, "/ovseg/labels", got.append, 10)
    camera = peer.create_publisher(Image, "/image", 10)
    rng = np.random.default_rng(0)
    msg = rgb_to_msg(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), Header())
    rows: list[dict[str, Any]] = []

    def row(label: str) -> None:
        allocated, reserved = gpu_mb()
        rows.append(
            {
                "state": label,
                "rss_mb": round(rss_mb(), 1),
                "model_tensors_mb": round(held_tensor_mb(node), 1),
                "gpu_allocated_mb": round(allocated, 1),
                "gpu_reserved_mb": round(reserved, 1),
            }
        )

    def step(transition: Any, label: str) -> None:
        if transition() != SUCCESS:
            raise RuntimeError(f"{label}: transition failed: {node.last_error}")
        row(label)

    try:
        row("unconfigured (start)")
        step(node.trigger_configure, "inactive (configured)")
        if node.trigger_activate() != SUCCESS:
            raise RuntimeError(f"activate: transition failed: {node.last_error}")
        deadline = time.monotonic() + timeout
        while len(got) < frames and time.monotonic() < deadline:
            msg.header.stamp = peer.get_clock().now().to_msg()
            camera.publish(msg)
            executor.spin_once(timeout_sec=0.05)
        if len(got) < frames:
            raise RuntimeError(f"only {len(got)} of {frames} label images within {timeout} s")
        row(f"active ({len(got)} frames)")
        step(node.trigger_deactivate, "inactive (deactivated)")
        step(node.trigger_cleanup, "unconfigured (cleaned up)")
    finally:
        node.trigger_shutdown()
        executor.shutdown()
        node.destroy_node()
        peer.destroy_node()
        context.try_shutdown()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows."""
    lines = [
        "| state | RSS (MB) | model tensors (MB) | GPU allocated (MB) | GPU reserved (MB) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['state']} | {r['rss_mb']:.0f} | {r['model_tensors_mb']:.0f} | "
            f"{r['gpu_allocated_mb']:.0f} | {r['gpu_reserved_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model (random weights)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--frames", type=int, default=10, help="label images while active")
    parser.add_argument("--size", default="640x480", help="frame size WIDTHxHEIGHT")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    rows = measure(args.model, args.device, args.frames, width, height)
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
