"""What the node's image outputs cost to hand to rclpy: Image messages against serialized bytes.

    python -m ovseg_ros.benchmarks.messages [--repeats N]

For each output at 640x480 and 1280x720 (random pixels, 11 classes): building the Image with
encode's ``*_to_msg`` and serializing it with rclpy.serialization.serialize_message (the
conversion to C and the CDR that ``publish`` does with a message), against building the CDR
bytes with ``*_to_bytes``, which the node publishes and rclpy passes on as they are. The RMW's
own copy into its buffer, which both pay, is in neither column. Medians of N calls.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

SIZES = ((480, 640), (720, 1280))
CLASSES = 11


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(
    sizes: tuple[tuple[int, int], ...] = SIZES, repeats: int = 200
) -> list[tuple[str, str, float, float]]:
    """Rows (size, output, Image ms, bytes ms), the three streamed outputs summed in a last row
    per size."""
    from rclpy.serialization import serialize_message
    from std_msgs.msg import Header

    from ..ros import encode
    from ..viz import class_mask

    header = Header(frame_id="camera_color_optical_frame")
    rows = []
    for height, width in sizes:
        rng = np.random.default_rng(0)
        labels = rng.integers(0, CLASSES, (height, width)).astype(np.uint8)
        confidence = rng.integers(0, 256, (height, width)).astype(np.uint8)
        overlay = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        masks = [class_mask(labels, c) for c in range(CLASSES)]
        size = f"{width}x{height}"
        cases = [
            ("labels (mono8)", labels, encode.labels_to_msg, encode.labels_to_bytes),
            ("confidence (mono8)", confidence, encode.mono8_to_msg, encode.mono8_to_bytes),
            ("overlay (rgb8)", overlay, encode.rgb_to_msg, encode.rgb_to_bytes),
        ]
        total_msg = total_bytes = 0.0
        for name, pixels, to_msg, to_bytes in cases:
            as_msg = _median_ms(lambda p=pixels, f=to_msg: serialize_message(f(p, header)), repeats)
            as_bytes = _median_ms(lambda p=pixels, f=to_bytes: f(p, header), repeats)
            total_msg, total_bytes = total_msg + as_msg, total_bytes + as_bytes
            rows.append((size, name, as_msg, as_bytes))
        rows.append((size, "labels + confidence + overlay", total_msg, total_bytes))
        few = max(1, repeats // 4)
        as_msg = _median_ms(
            lambda ms=masks: [serialize_message(encode.mono8_to_msg(m, header)) for m in ms], few
        )
        as_bytes = _median_ms(lambda ms=masks: [encode.mono8_to_bytes(m, header) for m in ms], few)
        rows.append((size, f"{CLASSES} masks", as_msg, as_bytes))
    return rows


def table(rows: list[tuple[str, str, float, float]]) -> str:
    """The rows as a Markdown table with the ratio bytes / Image."""
    lines = ["| size | output | Image ms | bytes ms | ratio |", "|---|---|---|---|---|"]
    for size, name, as_msg, as_bytes in rows:
        ratio = as_bytes / as_msg if as_msg > 0 else float("nan")
        lines.append(f"| {size} | {name} | {as_msg:.3f} | {as_bytes:.3f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ovseg_ros.benchmarks.messages", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=200, help="calls per figure (median)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    print(table(measure(repeats=args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
