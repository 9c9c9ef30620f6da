"""`ovseg bench` on the engine: the matrix, the step breakdown and the text timings in one run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine import Segmenter, SegmenterConfig
from .common import size_label
from .machine import OtherCpuUse, machine_info
from .matrix import FPS_NOTE, MatrixResult, run_matrix
from .steps import StepBreakdown, step_breakdown
from .text import VOC20, bench_text
from .variants import Variant, plan_variants


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
