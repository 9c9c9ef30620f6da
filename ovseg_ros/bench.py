"""Engine benchmarks: per-method frame latency and text-encoding speed, printed as Markdown."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .engine import Segmenter, SegmenterConfig
from .engine.templates import get_templates

#: A 20-class vocabulary (the PASCAL VOC classes) for text-encoding timings.
VOC20: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dining table",
    "dog",
    "horse",
    "motorbike",
    "person",
    "potted plant",
    "sheep",
    "sofa",
    "train",
    "tv monitor",
)


@dataclass
class Timing:
    """Latency figures of one benchmark row, in milliseconds."""

    label: str
    samples: list[float]

    @property
    def p50(self) -> float:
        """Median latency."""
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        """95th-percentile latency (nearest rank)."""
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Milliseconds of each of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def bench_methods(
    segmenter: Segmenter,
    methods: Sequence[str],
    modes: Sequence[str],
    size: tuple[int, int],
    repeats: int,
) -> list[Timing]:
    """Frame latency of segment() for each method x mode on one random frame of `size` (H, W).

    The configured method keeps its method_params overrides (e.g. --method proxyclip --param
    vfm_weights=none); the other methods run with their defaults.
    """
    frame = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    configured, overrides = segmenter.config.method, dict(segmenter.config.method_params)
    rows = []
    for name in methods:
        segmenter.set_method(name, overrides if name == configured else None)
        for mode in modes:
            segmenter.update(mode=mode)
            samples = time_calls(lambda: segmenter.segment(frame), repeats)
            rows.append(Timing(f"{name} / {mode}", samples))
    return rows


def bench_text(segmenter: Segmenter, templates: str, repeats: int = 1) -> dict[str, float]:
    """Seconds to encode VOC20 x templates with the full 77-token context and truncated."""
    enc = segmenter.text
    prompts = [t.format(c) for c in VOC20 for t in get_templates(templates)]
    tokens = enc.tokenize(prompts)

    def run(truncate: bool) -> None:
        for start in range(0, len(prompts), 256):
            enc.encode_tokens(tokens[start : start + 256], truncate=truncate)

    full = min(time_calls(lambda: run(False), repeats, warmup=0))
    short = min(time_calls(lambda: run(True), repeats, warmup=0))
    context = int(tokens.argmax(dim=-1).max()) + 1
    return {
        "prompts": len(prompts),
        "context": context,
        "full_s": full / 1e3,
        "truncated_s": short / 1e3,
        "speedup": full / short,
    }


def run_engine_bench(
    cfg: SegmenterConfig,
    methods: Sequence[str],
    modes: Sequence[str],
    size: tuple[int, int],
    repeats: int,
    text_templates: str | None,
) -> str:
    """Run the engine benchmarks and return a Markdown report."""
    seg = Segmenter(cfg)
    lines = [
        f"model {cfg.model_name} ({seg.backbone.source}), device {seg.device}, "
        f"dtype {str(seg.backbone.dtype).removeprefix('torch.')}, torch threads "
        f"{torch.get_num_threads()}, input {size[1]}x{size[0]}, short side {cfg.short_side}, "
        f"crop {cfg.crop} / stride {cfg.stride}, {repeats} timed frames per row",
        "",
        "| method / mode | p50 ms | p95 ms | frames/s |",
        "|---|---|---|---|",
    ]
    for row in bench_methods(seg, methods, modes, size, repeats):
        lines.append(f"| {row.label} | {row.p50:.0f} | {row.p95:.0f} | {1e3 / row.p50:.2f} |")
    if text_templates:
        t = bench_text(seg, text_templates)
        lines += [
            "",
            f"text encoding, {t['prompts']} prompts (20 classes x {text_templates}): full 77-token "
            f"context {t['full_s']:.2f} s, truncated to {t['context']} tokens "
            f"{t['truncated_s']:.2f} s, speed-up x{t['speedup']:.2f}",
        ]
    return "\n".join(lines)
