"""Speed of this checkout against another git revision, measured in one run.

`ovseg bench --against REV` checks REV out into a temporary git worktree and starts one worker
process per variant: REV's code with its default config, and this checkout's code with each
variant's config (e.g. `precision=bf16`, `quantize=int8`). The parent hands the same frames to the
workers in turn, round after round, so machine noise (other processes, clock changes) spreads
over all of them alike and the ratios come from one run. Each worker times what the node does per
frame through the engine's public API: `Segmenter.segment` and the overlay with its legend.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The worker: runs inside a checkout's own code (PYTHONPATH) and only uses APIs every revision
#: of the package has had: SegmenterConfig(**fields), Segmenter.segment, viz.overlay.
_WORKER = r"""
import json, sys, time
import numpy as np
from ovseg_ros.engine import Segmenter, SegmenterConfig
from ovseg_ros.viz import class_colors, overlay
cfg = SegmenterConfig(**json.loads(sys.argv[1]))
seg = Segmenter(cfg)
names = seg.vocabulary.names
colors = class_colors(max(len(names), 1))
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    h, w, seed = json.loads(line)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    result = seg.segment(rgb)
    t1 = time.perf_counter()
    overlay(rgb, result.labels, colors, 0.5, names)
    t2 = time.perf_counter()
    print(json.dumps({"segment": (t1 - t0) * 1e3, "overlay": (t2 - t1) * 1e3,
                      "labels": result.labels.tolist() if h * w <= 4096 else None}), flush=True)
"""


@dataclass
class Variant:
    """One worker: a label, the code it runs (a checkout root) and its config fields."""

    label: str
    root: Path
    config: dict[str, Any]
    samples: dict[str, list[float]] = field(default_factory=lambda: {"segment": [], "overlay": []})


def parse_variant(text: str) -> dict[str, Any]:
    """'precision=bf16,quantize=int8' -> {'precision': 'bf16', 'quantize': 'int8'}."""
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"a variant is NAME=VALUE[,NAME=VALUE...], got {text!r}")
        out[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    return out


def _worktree(repo: Path, revision: str, where: Path) -> Path:
    """Check revision out (detached) into where; ValueError if git cannot."""
    cmd = ["git", "-C", str(repo), "worktree", "add", "--detach", "--quiet", str(where), revision]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(f"cannot check out revision {revision!r}: {proc.stderr.strip()}")
    return where


def _start(variant: Variant) -> subprocess.Popen:
    """A worker process running variant.root's code."""
    env = {**os.environ, "PYTHONPATH": str(variant.root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, json.dumps(variant.config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=variant.root,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith('{"ready"'):
        proc.kill()
        raise ValueError(f"worker {variant.label!r} did not start (config {variant.config})")
    return proc


def run_against(
    repo: Path,
    revision: str,
    base_config: dict[str, Any],
    variants: Sequence[str],
    size: tuple[int, int],
    rounds: int,
    warmup: int = 1,
) -> dict[str, Any]:
    """Alternate frames between REV's code and this checkout's variants; medians and ratios."""
    here = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="ovseg-rev-") as tmp:
        old_root = _worktree(repo, revision, Path(tmp) / "rev")
        try:
            workers = [Variant(f"{revision} (start)", old_root, dict(base_config))]
            workers.append(Variant("this checkout", here, dict(base_config)))
            for text in variants:
                workers.append(Variant(text, here, {**base_config, **parse_variant(text)}))
            procs = [_start(v) for v in workers]
            try:
                labels: dict[str, Any] = {}
                for i in range(warmup + rounds):
                    for variant, proc in zip(workers, procs, strict=True):
                        assert proc.stdin and proc.stdout
                        proc.stdin.write(json.dumps([size[0], size[1], i]) + "\n")
                        proc.stdin.flush()
                        reply = json.loads(proc.stdout.readline())
                        if i >= warmup:
                            for key in variant.samples:
                                variant.samples[key].append(reply[key])
                        labels[variant.label] = reply["labels"]
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()
        finally:
            subprocess.run(
                ["git", "-C", str(repo), "worktree", "remove", "--force", str(old_root)],
                capture_output=True,
            )
    start_seg = statistics.median(workers[0].samples["segment"])
    start_ovl = statistics.median(workers[0].samples["overlay"])
    rows = []
    for v in workers:
        seg = statistics.median(v.samples["segment"])
        ovl = statistics.median(v.samples["overlay"])
        rows.append(
            {
                "variant": v.label,
                "config": v.config,
                "segment_ms": seg,
                "overlay_ms": ovl,
                "frame_ms": seg + ovl,
                "speedup_segment": start_seg / seg,
                "speedup_overlay": start_ovl / ovl,
                "speedup_frame": (start_seg + start_ovl) / (seg + ovl),
            }
        )
    return {
        "revision": revision,
        "size": f"{size[1]}x{size[0]}",
        "rounds": rounds,
        "rows": rows,
        "labels": labels,
    }


def format_against(result: dict[str, Any]) -> str:
    """Markdown table of a run_against result."""
    lines = [
        f"This checkout against {result['revision']}, {result['size']} frames, "
        f"{result['rounds']} rounds alternating between the workers (medians; speed-up = "
        "start / variant, measured in this one run)",
        "",
        "| variant | segment ms | overlay ms | segment x | overlay x | frame x |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['variant']} | {r['segment_ms']:.1f} | {r['overlay_ms']:.2f} | "
            f"{r['speedup_segment']:.2f} | {r['speedup_overlay']:.2f} | {r['speedup_frame']:.2f} |"
        )
    return "\n".join(lines)
