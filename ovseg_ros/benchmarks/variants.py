"""Variants of the engine (device, precision, quantize, compile, threads) and their Segmenters."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..engine import Segmenter, SegmenterConfig
from ..engine.clip_loading import resolve_device, resolve_dtype


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
