"""Engine benchmarks: latency matrix, peak memory, label agreement, per-step costs, text encoding.

`ovseg bench` (see cli.py) runs, in one process:

* the latency matrix: every method x input size x inference mode x variant, where a variant is one
  (device, precision, quantize, compile, threads) combination with a Segmenter of its own (reused
  over the methods, sizes and modes). Each row times `Segmenter.segment` on one random frame
  (fixed seed) after untimed warm-up frames and reports p50 / p95 latency, frames per second
  (1000 / mean latency) and the peak memory while the row ran: the process's peak resident set
  (the Linux high-water mark, reset before each row) and, on CUDA, torch's peak allocated memory;
* the label agreement of every variant that is not fp32 eager (another precision, int8, compile)
  with the fp32 eager variant of the same device: the fraction of pixels with the same label on a
  few sample photos resized to the row's size;
* the per-step breakdown of one frame (decode, resize, normalise, ViT, upsample, labels, copies,
  masks, overlay, messages: the functions the engine and the node call, timed one by one);
* text encoding of the 20 VOC classes with a template set: cold (full 77-token context),
  truncated (the context cut to the longest prompt) and from the disk cache.

The report is Markdown; `write_outputs` also writes bench.json and a PNG plot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from .engine import Segmenter, SegmenterConfig
from .engine.backbone import resolve_device, resolve_dtype
from .engine.inference import dense_maps, resize
from .engine.methods.base import collect_timings
from .engine.templates import get_templates
from .engine.text import TextEncoder, build_vocabulary

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

#: Methods timed when none are named: PEARL and the last-block family (no extra model).
DEFAULT_METHODS: tuple[str, ...] = ("pearl", "naclip", "sclip", "clearclip", "maskclip", "clip")

FPS_NOTE = "frames/s = 1000 / mean latency of the timed frames (one frame at a time)"
RANDOM_WEIGHTS_NOTE = (
    "with random weights (`--pretrained none`) the agreement is only indicative: trained weights "
    "give other (usually more confident, so more stable) label maps"
)


# --- small helpers -------------------------------------------------------------------------------


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


def _sync_for(device: torch.device) -> Callable[[], None]:
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
    from .samples import sample_images

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


# --- memory --------------------------------------------------------------------------------------


def _read_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_rss_peak() -> bool:
    """Reset the process's RSS high-water mark (Linux: '5' > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _read_status_kib("VmHWM") is not None


@dataclass
class PeakMemory:
    """Peak memory during a `with` block: host RSS and, on CUDA, torch's allocated memory."""

    device: torch.device
    cpu_rss_mib: float = 0.0
    gpu_allocated_mib: float | None = None
    cpu_source: str = ""

    def __enter__(self) -> PeakMemory:
        self._reset = reset_rss_peak()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gpu_allocated_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _read_status_kib("VmHWM") if self._reset else None
        if hwm is not None:
            self.cpu_rss_mib = hwm / 1024
            self.cpu_source = "VmHWM (reset per row)"
        else:
            # ru_maxrss is KiB on Linux and bytes on macOS; it is the peak of the whole process.
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.cpu_rss_mib = peak / (2**20 if platform.system() == "Darwin" else 1024)
            self.cpu_source = "ru_maxrss (peak of the process so far, cannot be reset)"


# --- variants ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One engine build: device, precision, int8 quantisation, torch.compile mode, CPU threads."""

    device: str
    precision: str
    quantize: str = "none"
    compile: str = "none"
    threads: int = 0  # 0 = torch's default thread count

    @property
    def label(self) -> str:
        """Short name, e.g. 'cpu fp32', 'cpu fp32 int8', 'cuda fp16 compile=default'."""
        parts = [self.device, self.precision]
        if self.quantize != "none":
            parts.append(self.quantize)
        if self.compile != "none":
            parts.append(f"compile={self.compile}")
        if self.threads:
            parts.append(f"{self.threads} threads")
        return " ".join(parts)

    @property
    def is_reference(self) -> bool:
        """fp32 eager: the variant the others' label maps are compared against."""
        return self.precision == "fp32" and self.quantize == "none" and self.compile == "none"

    def apply(self, cfg: SegmenterConfig) -> SegmenterConfig:
        """The config with this variant's fields."""
        return dataclasses.replace(
            cfg,
            device=self.device,
            precision=self.precision,
            quantize=self.quantize,
            compile=self.compile,
            threads=self.threads,
        ).validate()


def variant_problem(variant: Variant) -> str | None:
    """Why a variant cannot run on this machine (None when it can)."""
    try:
        device = resolve_device(variant.device)
        resolve_dtype(variant.precision, device)
    except ValueError as exc:
        return str(exc)
    if variant.quantize == "int8" and (device.type != "cpu" or variant.precision != "fp32"):
        return "int8 dynamic quantisation runs on the CPU in fp32 only"
    return None


def plan_variants(
    devices: Sequence[str],
    precisions: Sequence[str],
    quantize: Sequence[str] = ("none",),
    compile_modes: Sequence[str] = ("none",),
    threads: Sequence[int] = (0,),
) -> tuple[list[Variant], list[str]]:
    """Every valid combination (cross product), in order, and a note for each one skipped.

    'auto' device and precision resolve as the engine does (cuda if present; fp16 on CUDA, fp32
    on the CPU). Impossible pairs (fp16 on the CPU, a missing GPU, int8 outside CPU fp32) are
    left out with a note instead of an error.
    """
    variants: list[Variant] = []
    notes: list[str] = []
    for dev, prec, quant, comp, thr in itertools.product(
        devices, precisions, quantize, compile_modes, threads
    ):
        try:
            device = resolve_device(dev)
        except ValueError as exc:
            note = f"skipped device {dev}: {exc}"
            if note not in notes:
                notes.append(note)
            continue
        name = str(device) if dev != "auto" else device.type
        precision = prec
        if prec == "auto":
            precision = "fp16" if device.type == "cuda" else "fp32"
        variant = Variant(name, precision, quant, comp, int(thr))
        if variant in variants:
            continue
        problem = variant_problem(variant)
        if problem:
            notes.append(f"skipped {variant.label}: {problem}")
            continue
        variants.append(variant)
    return variants, notes


def _not_in_effect(segmenter: Segmenter, variant: Variant) -> str | None:
    """Why a built Segmenter does not run as the variant asks (an engine without the feature)."""
    backbone = segmenter.backbone
    if variant.quantize != "none" and not getattr(backbone, "quantized", False):
        return f"model.quantize {variant.quantize} is not applied by this engine build"
    if variant.compile != "none" and getattr(backbone, "compile_mode", "none") != variant.compile:
        return f"model.compile {variant.compile} is not applied by this engine build"
    return None


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[int]:
    """Run the block with `count` torch threads (0 = as now); restore the previous count."""
    before = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# --- the latency matrix --------------------------------------------------------------------------


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
    sync = _sync_for(segmenter.device)
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


def build_segmenter(cfg: SegmenterConfig, variant: Variant) -> tuple[Segmenter | None, str | None]:
    """The Segmenter of a variant, or None and why it cannot be built / does not apply."""
    try:
        segmenter = Segmenter(variant.apply(cfg))
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        return None, f"skipped {variant.label}: {exc}"
    problem = _not_in_effect(segmenter, variant)
    if problem:
        return None, f"skipped {variant.label}: {problem}"
    return segmenter, None


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


# --- one frame, step by step ---------------------------------------------------------------------


@dataclass
class StepBreakdown:
    """Median ms of each step of one frame, in pipeline order."""

    size: str
    method: str
    mode: str
    variant: str
    steps: dict[str, float]
    vit_step: str
    segment_ms: float  # Segmenter.segment on the same frame, for comparison with the engine steps
    engine_steps: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        """Sum of the steps."""
        return sum(self.steps.values())

    @property
    def outside_vit_ms(self) -> float:
        """Everything but the ViT forward."""
        return self.total_ms - self.steps[self.vit_step]

    @property
    def outside_vit_share(self) -> float:
        """Share of the frame outside the ViT, 0..1."""
        return self.outside_vit_ms / self.total_ms if self.total_ms > 0 else 0.0

    def shares(self) -> dict[str, float]:
        """Each step's share of the summed frame time (0..1)."""
        total = self.total_ms or 1.0
        return {k: v / total for k, v in self.steps.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready breakdown."""
        out = dataclasses.asdict(self)
        out.update(
            total_ms=self.total_ms,
            outside_vit_ms=self.outside_vit_ms,
            outside_vit_share=self.outside_vit_share,
            shares=self.shares(),
        )
        return out


VIT_STEP = "ViT + method head (method.logits)"
#: Parts of a method's timings (Method.record_timing) that run outside the ViT and get their own
#: step: PEARL's propagation of the frame's logits.
FRAME_STEP_TIMINGS = ("tlp",)


def step_breakdown(
    segmenter: Segmenter,
    size: tuple[int, int] = (480, 640),
    repeats: int = 5,
    mode: str = "whole",
    variant: str = "",
    alpha: float = 0.5,
) -> StepBreakdown:
    """Time each step of one frame the way the node runs it, with the functions it calls.

    Engine steps (Segmenter.segment): the upload (HostStaging) + resize, backbone.normalize,
    method.logits on the whole input or every crop (inference.dense_maps: the ViT), then
    Segmenter._labels (labeling.label_pixels: the logits upsampled to the input and to the frame,
    the softmax over queries, background, thresholds, argmax) and Segmenter._download
    (device->host copy with the per-class statistics). Node steps (node._process): decoding the
    rgb8 Image (codec.image_to_rgb), confidence to 8 bits (viz.confidence_u8), one mask per class
    (viz.class_mask), the overlay with its legend (viz.overlay) and the output messages (labels,
    confidence, overlay, masks). The frame is a sample photo resized to `size`; each step's figure
    is the median of `repeats` frames after one untimed one.
    """
    from . import viz

    cfg = segmenter.config.replace(mode=mode)
    backbone, method, vocab = segmenter.backbone, segmenter.method, segmenter.vocabulary
    device = segmenter.device
    sync = _sync_for(device)
    rgb = photo_frames(size, 1)[0]
    notes: list[str] = []
    try:
        from .ros.codec import image_to_rgb, labels_to_msg, mono8_to_msg, rgb_to_msg

        msg = rgb_to_msg(rgb, None)
    except ImportError as exc:  # no ROS message packages: engine steps only
        msg = None
        notes.append(f"ROS message steps left out ({exc})")
    n = vocab.num_classes
    colors = viz.class_colors(max(n, 1))

    def to_host(pixels: Any) -> tuple[np.ndarray, np.ndarray]:
        # As Segmenter.segment after _labels: download with the per-class sums, then the
        # fractions and mean scores.
        labels_np, conf_np, counts, sums = segmenter._download(pixels, vocab)
        _ = (counts / labels_np.size).astype(np.float32)
        _ = np.where(counts > 0, sums / np.maximum(counts, 1), 0).astype(np.float32)
        return labels_np, conf_np

    samples: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], Any], on_device: bool = False) -> Any:
        start = time.perf_counter()
        out = fn()
        if on_device:
            sync()
        samples.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        return out

    def one_frame() -> None:
        frame = rgb
        if msg is not None:
            frame = timed("decode Image (codec.image_to_rgb)", lambda: image_to_rgb(msg))
        patch = backbone.patch_size if cfg.mode == "whole" else 0
        image = timed(
            "to tensor + resize",
            lambda: resize(segmenter._staging.upload(frame, device), cfg.short_side, patch),
            True,
        )
        normed = timed("normalise", lambda: backbone.normalize(image), True)
        with collect_timings() as parts:
            maps = timed(
                VIT_STEP,
                lambda: dense_maps(
                    method,
                    backbone,
                    normed,
                    vocab,
                    cfg.mode,
                    cfg.crop,
                    cfg.stride,
                    cfg.max_batch,
                    frame_size=frame.shape[:2],
                ),
                True,
            )
        for key in FRAME_STEP_TIMINGS:
            if key in parts:
                samples[VIT_STEP][-1] -= parts[key]
                samples.setdefault(f"method frame step: {key}", []).append(parts[key])
        pixels = timed(
            "labels: upsample, softmax, argmax, thresholds (Segmenter._labels)",
            lambda: segmenter._labels(maps, image, cfg, frame.shape[:2]),
            True,
        )
        labels, conf = timed("device->host copy + per-class stats", lambda: to_host(pixels))
        conf8 = timed("confidence to 8 bits", lambda: viz.confidence_u8(conf))
        masks = timed(
            f"masks ({n}, one per class)", lambda: [viz.class_mask(labels, c) for c in range(n)]
        )
        image_out = timed(
            "overlay + legend (viz.overlay)",
            lambda: viz.overlay(frame, labels, colors, alpha, vocab.names),
        )
        if msg is not None:
            header = msg.header
            timed(
                "messages: labels, confidence, overlay, masks",
                lambda: (
                    labels_to_msg(labels, header),
                    mono8_to_msg(conf8, header),
                    rgb_to_msg(image_out, header),
                    [mono8_to_msg(m, header) for m in masks],
                ),
            )

    with torch.inference_mode():
        one_frame()
        samples.clear()
        for _ in range(repeats):
            one_frame()
    steps = {k: statistics.median(v) for k, v in samples.items()}
    engine_steps = [
        k
        for k in steps
        if not k.startswith(("decode", "confidence to", "masks", "overlay", "messages"))
    ]
    segment_ms = statistics.median(
        time_calls(lambda: segmenter.segment(rgb), repeats, warmup=0, sync=sync)
    )
    return StepBreakdown(
        size=size_label(size),
        method=cfg.method,
        mode=cfg.mode,
        variant=variant,
        steps=steps,
        vit_step=VIT_STEP,
        segment_ms=segment_ms,
        engine_steps=engine_steps,
        notes=notes,
    )


# --- text encoding -------------------------------------------------------------------------------


def bench_text(
    segmenter: Segmenter, templates: str = "imagenet80", classes: Sequence[str] = VOC20
) -> dict[str, Any]:
    """Seconds to encode `classes` x `templates` through TextEncoder / build_vocabulary.

    cold: a fresh encoder without cache, the full 77-token context (encode_tokens with
    truncate=False); truncated: a fresh encoder without cache, the context cut to the longest
    prompt (the engine's path); cached_disk: a second fresh encoder reading what a first one
    wrote to a temporary disk cache; cached_memory: that encoder again (its memory cache).
    """
    backbone, name = segmenter.backbone, segmenter.config.model_name

    def encoder(cache: Path | None) -> TextEncoder:
        return TextEncoder(backbone.model, name, backbone.device, backbone.dtype, cache)

    def build(enc: TextEncoder) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        vocab = build_vocabulary(enc, 0, list(classes), [], templates)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize(backbone.device)
        return time.perf_counter() - start, vocab.embeddings

    cold_enc = encoder(None)

    def full_context(tokens: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        return TextEncoder.encode_tokens(cold_enc, tokens, truncate=False)

    cold_enc.encode_tokens = full_context  # type: ignore[method-assign]
    cold_s, cold_emb = build(cold_enc)
    truncated_s, short_emb = build(encoder(None))
    with tempfile.TemporaryDirectory(prefix="ovseg_bench_text_") as tmp:
        first_s, _ = build(encoder(Path(tmp)))
        reader = encoder(Path(tmp))
        calls = reader.model_calls
        disk_s, _ = build(reader)
        memory_s, _ = build(reader)
        from_disk = reader.model_calls == calls
    prompts = [t.format(c) for c in classes for t in get_templates(templates)]
    context = int(cold_enc.tokenize(prompts).argmax(dim=-1).max()) + 1
    return {
        "classes": len(classes),
        "templates": templates,
        "prompts": len(prompts),
        "context": context,
        "cold_s": cold_s,
        "truncated_s": truncated_s,
        "first_with_cache_s": first_s,
        "cached_disk_s": disk_s,
        "cached_memory_s": memory_s,
        "cache_hit_without_model": from_disk,
        "speedup_truncated": cold_s / truncated_s if truncated_s > 0 else float("inf"),
        "max_abs_diff_truncated": float((cold_emb - short_emb).abs().max()),
    }


# --- the whole engine bench ----------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, torch version and GPU (when one is visible)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


class OtherCpuUse:
    """Share of the machine's CPU time that other processes used between start() and share().

    Other processes skew the figures; this says by how much the machine was shared. Linux only
    (/proc/stat); share() is None elsewhere.
    """

    def __init__(self) -> None:
        self._start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float] | None:
        """(wall s, busy CPU s of the machine, CPU s of this process)."""
        try:
            with open("/proc/stat") as fh:
                values = [int(v) for v in fh.readline().split()[1:9]]
            hz = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, AttributeError):
            return None
        busy = sum(values) - values[3] - values[4]  # all but idle and iowait
        mine = os.times()
        return time.monotonic(), busy / hz, mine.user + mine.system

    def share(self) -> float | None:
        """Fraction (0..1) of all cores' time used by other processes since construction."""
        now = self._now()
        if now is None or self._start is None:
            return None
        wall = (now[0] - self._start[0]) * (os.cpu_count() or 1)
        others = (now[1] - self._start[1]) - (now[2] - self._start[2])
        return min(1.0, max(0.0, others / wall)) if wall > 0 else None


@dataclass
class EngineBench:
    """Everything one `ovseg bench` run measured on the engine."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    matrix: MatrixResult
    steps: StepBreakdown | None = None
    text: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready result."""
        return {
            "machine": self.machine,
            "settings": self.settings,
            "rows": [r.to_dict() for r in self.matrix.rows],
            "notes": self.matrix.notes,
            "memory_source": self.matrix.memory_source,
            "fps": FPS_NOTE,
            "steps": self.steps.to_dict() if self.steps else None,
            "text": self.text,
        }


def run_engine_bench(
    cfg: SegmenterConfig,
    methods: Sequence[str],
    modes: Sequence[str],
    sizes: Sequence[tuple[int, int]] | tuple[int, int],
    repeats: int,
    text_templates: str | None,
    *,
    devices: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    quantize: Sequence[str] | None = None,
    compile_modes: Sequence[str] | None = None,
    threads: Sequence[int] | None = None,
    warmup: int = 1,
    seed: int = 0,
    agreement_frames: int = 3,
    steps_size: tuple[int, int] | None = (480, 640),
    progress: Callable[[str], None] | None = None,
) -> EngineBench:
    """Run the matrix, the step breakdown and the text timings (see module doc).

    Unset variant lists take the config's own value (device, precision, quantize, compile,
    threads). The step breakdown and the text timings use the first variant's Segmenter and the
    configured method in the first mode.
    """
    if sizes and isinstance(sizes[0], int):
        sizes = [sizes]  # type: ignore[list-item]
    sizes = list(sizes)  # type: ignore[arg-type]
    variants, notes = plan_variants(
        devices or [cfg.device],
        precisions or [cfg.precision],
        quantize or [cfg.quantize],
        compile_modes or [cfg.compile],
        threads if threads else [cfg.threads],
    )
    extra: dict[str, Any] = {}
    machine = machine_info()
    others = OtherCpuUse()

    def on_first(segmenter: Segmenter, variant: Variant) -> None:
        if steps_size is not None:
            if progress:
                progress(f"step breakdown {size_label(steps_size)} ({variant.label})")
            segmenter.set_method(cfg.method, dict(cfg.method_params))
            extra["steps"] = step_breakdown(segmenter, steps_size, repeats, modes[0], variant.label)
        if text_templates:
            if progress:
                progress(f"text encoding, {len(VOC20)} classes x {text_templates}")
            extra["text"] = bench_text(segmenter, text_templates)

    matrix = run_matrix(
        cfg,
        variants,
        methods,
        sizes,
        modes,
        repeats,
        warmup,
        seed,
        agreement_frames,
        on_first,
        progress,
    )
    matrix.notes[:0] = notes
    settings = {
        "model": cfg.model_name,
        "weights": "random" if cfg.model_pretrained == "none" else cfg.model_pretrained,
        "methods": list(methods),
        "sizes": [size_label(s) for s in sizes],
        "modes": list(modes),
        "variants": [v.label for v in variants],
        "short_side": cfg.short_side,
        "crop": cfg.crop,
        "stride": cfg.stride,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "agreement_frames": agreement_frames,
        "classes": len(cfg.vocabulary),
        "templates": cfg.templates,
    }
    machine["other_processes_cpu_share"] = others.share()
    return EngineBench(machine, settings, matrix, extra.get("steps"), extra.get("text"))


# --- report --------------------------------------------------------------------------------------


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_machine(machine: dict[str, Any]) -> str:
    """One line describing the machine."""
    parts = [
        f"{machine['cpu']}, {machine['cores']} cores",
        f"{machine['memory_gib']} GiB RAM" if machine.get("memory_gib") else "",
        f"torch {machine['torch']} ({machine['torch_threads']} threads)",
        f"GPU {machine['gpu']}" if machine.get("gpu") else "no GPU",
        (
            f"other processes used {machine['other_processes_cpu_share']:.0%} of the CPU time "
            "during the run"
            if machine.get("other_processes_cpu_share") is not None
            else ""
        ),
    ]
    return ", ".join(p for p in parts if p)


def format_engine_bench(bench: EngineBench) -> str:
    """Markdown report of an engine bench."""
    s = bench.settings
    lines = [
        f"Machine: {format_machine(bench.machine)}",
        "",
        f"Model {s['model']} ({s['weights']} weights), short side {s['short_side']}, slide "
        f"{s['crop']}/{s['stride']}, {s['classes']} classes, {s['repeats']} timed frames per row "
        f"after {s['warmup']} untimed, random frame (seed {s['seed']}); {FPS_NOTE}; peak CPU "
        f"memory = {bench.matrix.memory_source or 'process RSS'}",
        "",
        "| variant | method | input | mode | p50 ms | p95 ms | frames/s | peak RSS MiB "
        "| peak GPU MiB | agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bench.matrix.rows:
        agree = "-" if r.agreement is None else f"{r.agreement:.3f}"
        lines.append(
            f"| {r.variant} | {r.method} | {r.size} | {r.mode} | {r.p50:.1f} | {r.p95:.1f} "
            f"| {r.fps:.2f} | {_mib(r.cpu_peak_rss_mib)} | {_mib(r.gpu_peak_allocated_mib)} "
            f"| {agree} |"
        )
    if bench.matrix.notes:
        lines.append("")
        lines += [f"- {note}" for note in bench.matrix.notes]
    if bench.steps is not None:
        lines += ["", format_steps(bench.steps)]
    if bench.text is not None:
        lines += ["", format_text(bench.text)]
    return "\n".join(lines)


def format_steps(b: StepBreakdown) -> str:
    """Markdown table of a step breakdown with the share outside the ViT."""
    lines = [
        f"Steps of one {b.size} frame ({b.method}, {b.mode}, {b.variant}), median ms:",
        "",
        "| step | ms | share |",
        "|---|---|---|",
    ]
    shares = b.shares()
    for name, ms in b.steps.items():
        lines.append(f"| {name} | {ms:.2f} | {shares[name]:.1%} |")
    target = "meets" if b.outside_vit_share < 0.10 else "misses"
    engine = sum(b.steps[k] for k in b.engine_steps)
    lines += [
        f"| **total** | {b.total_ms:.2f} | 100% |",
        "",
        f"Outside the ViT: {b.outside_vit_ms:.2f} ms = {b.outside_vit_share:.1%} of the frame "
        f"({target} the < 10% target). Engine steps together {engine:.1f} ms; "
        f"Segmenter.segment on the same frame {b.segment_ms:.1f} ms.",
    ]
    lines += [f"- {note}" for note in b.notes]
    return "\n".join(lines)


def format_text(t: dict[str, Any]) -> str:
    """Markdown table of the text-encoding timings."""
    return "\n".join(
        [
            f"Text encoding, {t['classes']} classes x {t['templates']} = {t['prompts']} prompts:",
            "",
            "| path | s |",
            "|---|---|",
            f"| cold: no cache, full 77-token context | {t['cold_s']:.3f} |",
            f"| cold: no cache, context truncated to {t['context']} tokens | "
            f"{t['truncated_s']:.3f} |",
            f"| first build writing the disk cache | {t['first_with_cache_s']:.3f} |",
            f"| cached: disk cache hit (new encoder) | {t['cached_disk_s']:.4f} |",
            f"| cached: memory cache hit | {t['cached_memory_s']:.4f} |",
            "",
            f"Truncation x{t['speedup_truncated']:.2f} faster, embeddings within "
            f"{t['max_abs_diff_truncated']:.1e} of the full context.",
        ]
    )


# --- files ---------------------------------------------------------------------------------------


def plot_latency(rows: Sequence[Row], path: Path, title: str = "") -> Path:
    """PNG bar chart (matplotlib, Agg): p50 per method, one bar per resolution, p95 whiskers.

    One panel per variant (device / precision / quantize / compile / threads) and mode, two
    columns when there are more than two panels, one legend of the resolutions for all.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: dict[str, list[Row]] = {}
    for r in rows:
        panels.setdefault(f"{r.variant}, {r.mode}", []).append(r)
    if not panels:
        raise ValueError("no rows to plot")
    sizes = list(dict.fromkeys(r.size for r in rows))
    methods_all = list(dict.fromkeys(r.method for r in rows))
    ncols = 1 if len(panels) <= 2 else 2
    nrows = -(-len(panels) // ncols)
    panel_w = max(4.5, 0.55 * len(methods_all) * max(1, len(sizes)) + 1.5)
    fig = Figure(figsize=(panel_w * ncols, 2.8 * nrows + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    # One latency scale for all panels, so that the variants compare at a glance.
    axes = list(fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel())
    top = 1.15 * max(r.p95 for r in rows)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    bar_w = 0.8 / max(1, len(sizes))
    handles: dict[str, Any] = {}
    for ax, (name, prow) in zip(axes, panels.items(), strict=False):
        methods = [m for m in methods_all if any(r.method == m for r in prow)]
        for j, size in enumerate(sizes):
            xs, p50, err = [], [], []
            for i, method in enumerate(methods):
                match = [r for r in prow if r.method == method and r.size == size]
                if match:
                    xs.append(i + (j - (len(sizes) - 1) / 2) * bar_w)
                    p50.append(match[0].p50)
                    err.append(max(0.0, match[0].p95 - match[0].p50))
            if not xs:
                continue
            bars = ax.bar(
                xs,
                p50,
                bar_w,
                yerr=[[0] * len(err), err],
                capsize=3,
                error_kw={"elinewidth": 0.8, "alpha": 0.6},
                color=colors[j % len(colors)],
            )
            handles.setdefault(size, bars)
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.set_xticks(range(len(methods)), methods, fontsize=8)
        ax.set_ylabel("p50 ms (whisker: p95)", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, top)
        ax.yaxis.set_tick_params(labelleft=True)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    legend = {"title": "input size", "ncols": len(handles), "fontsize": 8, "title_fontsize": 8}
    try:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", **legend)
    except ValueError:  # matplotlib < 3.7 (Ubuntu 24.04 has 3.6) has no "outside" placement
        axes[0].legend(list(handles.values()), list(handles), loc="upper left", **legend)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_outputs(
    bench: EngineBench, out_dir: Path, command: str = "", date: str = ""
) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png (when there are rows) into out_dir."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = date or time.strftime("%Y-%m-%d")
    data = {"command": command, "date": date, **bench.to_dict()}
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md"}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    head = [f"# ovseg bench, {date}", ""]
    if command:
        head += [f"`{command}`", ""]
    paths["md"].write_text("\n".join(head) + format_engine_bench(bench) + "\n")
    if bench.matrix.rows:
        title = f"{bench.settings['model']} ({bench.settings['weights']} weights), " + (
            bench.machine.get("gpu") or bench.machine["cpu"]
        )
        paths["png"] = plot_latency(bench.matrix.rows, out_dir / "bench.png", title)
    return paths


__all__ = [
    "DEFAULT_METHODS",
    "VOC20",
    "EngineBench",
    "MatrixResult",
    "PeakMemory",
    "Row",
    "StepBreakdown",
    "Variant",
    "bench_text",
    "bench_variant",
    "format_engine_bench",
    "label_agreement",
    "parse_size",
    "plan_variants",
    "plot_latency",
    "run_engine_bench",
    "run_matrix",
    "segmenter_agreement",
    "step_breakdown",
    "time_calls",
    "write_outputs",
]
