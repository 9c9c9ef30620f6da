"""Shared helpers of the benchmarks: frame sizes, percentiles, timed calls, test frames and the
label agreement of two segmenters."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch

from ..engine import Segmenter


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' (W x H) -> (480, 640) as (H, W); ValueError for anything else."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"frame size must be WIDTHxHEIGHT like 640x480, got {text!r}") from None
    if width < 1 or height < 1:
        raise ValueError(f"frame size must be positive, got {text!r}")
    return height, width


def size_label(size: tuple[int, int]) -> str:
    """(H, W) -> 'WxH'."""
    return f"{size[1]}x{size[0]}"


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile q in [0, 100] of samples."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def time_calls(
    fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None
) -> list[float]:
    """Milliseconds of each of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def sync_for(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def random_frame(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A reproducible random HxWx3 uint8 frame (the same for a given size and seed)."""
    rng = np.random.default_rng([seed, size[0], size[1]])
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    from ..samples import sample_images

    return tuple(rgb for _, rgb in sample_images())


def photo_frames(size: tuple[int, int], count: int) -> list[np.ndarray]:
    """`count` of the bundled sample photos, resized to (H, W)."""
    photos = _photos()
    height, width = size
    return [
        np.ascontiguousarray(
            cv2.resize(photos[i % len(photos)], (width, height), interpolation=cv2.INTER_AREA)
        )
        for i in range(count)
    ]


def label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels with the same label in two label maps of one shape."""
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    return float(np.mean(a == b)) if a.size else 1.0


def segmenter_agreement(
    segmenter: Segmenter, reference: Segmenter, frames: Sequence[np.ndarray]
) -> float:
    """Mean label agreement of two segmenters (as they are configured now) over frames."""
    return statistics.fmean(
        label_agreement(segmenter.segment(f).labels, reference.segment(f).labels) for f in frames
    )
