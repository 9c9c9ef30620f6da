"""The latency matrix: every method x input size x inference mode x variant, with peak memory and
the label agreement of each variant with the fp32 eager one of its device."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..engine import Segmenter, SegmenterConfig
from .common import (
    label_agreement,
    percentile,
    photo_frames,
    random_frame,
    size_label,
    sync_for,
    time_calls,
)
from .machine import PeakMemory
from .variants import Variant, build_segmenter, torch_threads

#: Methods timed when none are named: PEARL and the last-block family (no extra model).
DEFAULT_METHODS: tuple[str, ...] = ("pearl", "naclip", "sclip", "clearclip", "maskclip", "clip")

FPS_NOTE = "frames/s = 1000 / mean latency of the timed frames (one frame at a time)"
RANDOM_WEIGHTS_NOTE = (
    "with random weights (`--pretrained none`) the agreement is only indicative: trained weights "
    "give other (usually more confident, so more stable) label maps"
)


@dataclass
class Row:
    """One timed combination of the matrix (times in ms, memory in MiB)."""

    variant: str
    device: str
    precision: str
    quantize: str
    compile: str
    threads: int
    method: str
    size: str
    mode: str
    samples: list[float]
    cpu_peak_rss_mib: float
    gpu_peak_allocated_mib: float | None = None
    agreement: float | None = None  # vs the fp32 eager variant of the device, on sample photos

    @property
    def p50(self) -> float:
        """Median latency."""
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        """95th-percentile latency (nearest rank)."""
        return percentile(self.samples, 95)

    @property
    def mean(self) -> float:
        """Mean latency."""
        return statistics.fmean(self.samples)

    @property
    def fps(self) -> float:
        """Frames per second, 1000 / mean latency."""
        return 1e3 / self.mean

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready row with the derived figures."""
        out = dataclasses.asdict(self)
        out.update(p50_ms=self.p50, p95_ms=self.p95, mean_ms=self.mean, fps=self.fps)
        return out


@dataclass
class MatrixResult:
    """Rows, notes (skipped combinations, caveats) and how memory was measured."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    memory_source: str = ""
    references: dict[tuple[str, str, str, str], list[np.ndarray]] = field(default_factory=dict)


def bench_variant(
    segmenter: Segmenter,
    variant: Variant,
    methods: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    modes: Sequence[str],
    repeats: int,
    warmup: int = 1,
    seed: int = 0,
    agreement_frames: int = 0,
    result: MatrixResult | None = None,
    timed: bool = True,
    store_reference: bool = True,
) -> MatrixResult:
    """Time one Segmenter over methods x sizes x modes; add its rows and notes to `result`.

    The fp32 eager variant of a device stores its label maps of the agreement photos in
    result.references (with store_reference); a later variant of the device is compared against
    them. `timed=False` only stores those references (a reference built for the comparison, not
    asked for).
    The configured method keeps its method_params overrides (e.g. --method proxyclip --param
    vfm_weights=none); the other methods run with their defaults.
    """
    result = result or MatrixResult()
    sync = sync_for(segmenter.device)
    configured, overrides = segmenter.config.method, dict(segmenter.config.method_params)
    if variant.compile != "none":
        warmup = max(warmup, 2)  # the first frame of a size compiles, the second may recompile
    threads = torch.get_num_threads()
    for name in methods:
        try:
            segmenter.set_method(name, overrides if name == configured else None)
        except (ValueError, RuntimeError) as exc:
            note = f"skipped method {name} ({variant.label}): {exc}"
            if note not in result.notes:
                result.notes.append(note)
            continue
        for size, mode in itertools.product(sizes, modes):
            segmenter.update(mode=mode)
            key = (variant.device, name, size_label(size), mode)
            wanted = agreement_frames and (not variant.is_reference or store_reference)
            photos = photo_frames(size, agreement_frames) if wanted else []
            if variant.is_reference and store_reference:
                if photos and key not in result.references:
                    result.references[key] = [segmenter.segment(p).labels for p in photos]
            if not timed:
                continue
            frame = random_frame(size, seed)
            try:
                for _ in range(warmup):
                    segmenter.segment(frame)
            except (RuntimeError, ValueError) as exc:  # e.g. a compile backend that fails
                result.notes.append(
                    f"failed {variant.label} / {name} / {size_label(size)} / {mode}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                )
                continue
            with PeakMemory(segmenter.device) as mem:
                samples = time_calls(lambda f=frame: segmenter.segment(f), repeats, 0, sync)
            result.memory_source = mem.cpu_source
            agreement = None
            if photos and not variant.is_reference and key in result.references:
                agreement = statistics.fmean(
                    label_agreement(segmenter.segment(p).labels, ref)
                    for p, ref in zip(photos, result.references[key], strict=True)
                )
            result.rows.append(
                Row(
                    variant=variant.label,
                    device=variant.device,
                    precision=variant.precision,
                    quantize=variant.quantize,
                    compile=variant.compile,
                    threads=threads,
                    method=name,
                    size=size_label(size),
                    mode=mode,
                    samples=samples,
                    cpu_peak_rss_mib=mem.cpu_rss_mib,
                    gpu_peak_allocated_mib=mem.gpu_allocated_mib,
                    agreement=agreement,
                )
            )
    return result


def run_matrix(
    cfg: SegmenterConfig,
    variants: Sequence[Variant],
    methods: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    modes: Sequence[str],
    repeats: int,
    warmup: int = 1,
    seed: int = 0,
    agreement_frames: int = 3,
    on_first: Callable[[Segmenter, Variant], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> MatrixResult:
    """The whole matrix: one Segmenter per variant (built, used, freed in turn).

    The fp32 eager variant of each device runs first; when a device has other variants but no
    fp32 eager one, one is built for the agreement only (untimed). `on_first` runs with the first
    variant's Segmenter while it is alive (the step breakdown and the text timings use it).
    """
    result = MatrixResult()
    order = sorted(variants, key=lambda v: (not v.is_reference, list(variants).index(v)))
    plan: list[tuple[Variant, bool]] = [(v, True) for v in order]
    if agreement_frames:
        for device in dict.fromkeys(v.device for v in variants):
            mine = [v for v in variants if v.device == device]
            if any(not v.is_reference for v in mine) and not any(v.is_reference for v in mine):
                ref = Variant(device, "fp32", threads=mine[0].threads)
                plan.insert(0, (ref, False))
    compared = {v.device for v in variants if not v.is_reference}
    first = True
    for variant, timed in plan:
        if progress:
            progress(f"{variant.label}{'' if timed else ' (agreement reference only)'}")
        with torch_threads(variant.threads):
            segmenter, problem = build_segmenter(cfg, variant)
            if segmenter is None:
                result.notes.append(problem or f"skipped {variant.label}")
                continue
            try:
                bench_variant(
                    segmenter,
                    variant,
                    methods,
                    sizes,
                    modes,
                    repeats,
                    warmup,
                    seed,
                    agreement_frames,
                    result,
                    timed,
                    store_reference=variant.device in compared,
                )
                if timed and first and on_first is not None:
                    on_first(segmenter, variant)
                first = first and not timed
            finally:
                del segmenter
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    if any(r.agreement is not None for r in result.rows):
        result.notes.append(
            "agreement = fraction of pixels with the same label as the fp32 eager variant of the "
            f"device, mean over {agreement_frames} sample photos resized to the row's size; "
            + RANDOM_WEIGHTS_NOTE
        )
    return result
