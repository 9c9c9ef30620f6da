"""PNG bar chart of the latency matrix (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .matrix import Row


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
