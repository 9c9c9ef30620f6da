"""The engine bench as Markdown, and the files it writes: bench.json, bench.md, bench.png."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .engine_bench import EngineBench
from .machine import format_machine
from .matrix import FPS_NOTE
from .plot import plot_latency
from .steps import StepBreakdown


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


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


def write_outputs(
    bench: EngineBench, out_dir: Path, command: str = "", date: str = ""
) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png (when there are rows) into out_dir."""
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
