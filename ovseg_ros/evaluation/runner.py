"""Run a Segmenter over a dataset and score it: the report dict, its JSON and Markdown forms."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..engine import Segmenter
from ..viz import overlay, palette
from .datasets import Dataset
from .metrics import IGNORE_INDEX, ConfusionMatrix
from .vocabularies import EvalVocabulary

#: Config fields the report's vocabulary section already holds.
_VOCABULARY_FIELDS = ("vocabulary", "background_words")


def check_vocabulary(segmenter: Segmenter, vocabulary: EvalVocabulary) -> None:
    """ValueError unless the segmenter's classes are the vocabulary's non-background classes."""
    engine = [list(c.synonyms) for c in segmenter.vocabulary.classes]
    wanted = [list(vocabulary.queries[i]) for i in vocabulary.engine_ids()]
    # The engine drops a repeated synonym, so compare first queries and class counts only.
    if len(engine) != len(wanted) or [e[0] for e in engine] != [w[0] for w in wanted]:
        raise ValueError(
            f"the segmenter's vocabulary ({len(engine)} classes) is not the evaluation "
            f"vocabulary {vocabulary.name!r} ({len(wanted)} classes besides background); build "
            "the segmenter with vocabulary=EvalVocabulary.engine_entries()"
        )


def evaluate(
    segmenter: Segmenter,
    dataset: Dataset,
    vocabulary: EvalVocabulary,
    limit: int | None = None,
    progress: bool = True,
    predictions_dir: Path | None = None,
) -> dict[str, Any]:
    """Segment every image (the first `limit`), accumulate the confusion matrix, return a report."""
    from tqdm import tqdm

    check_vocabulary(segmenter, vocabulary)
    items = dataset.items[:limit] if limit else dataset.items
    matrix = ConfusionMatrix(vocabulary.num_classes)
    failed: list[dict[str, str]] = []
    engine_ms: list[float] = []
    if predictions_dir is not None:
        predictions_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = tqdm(items, desc=f"eval {dataset.name}", unit="image", disable=not progress)
    for item in bar:
        try:
            rgb, gt = dataset.read(item)
            result = segmenter.segment(rgb)
            pred = vocabulary.to_dataset(result.labels, result.unlabeled)
            matrix.update(gt, pred)
        except ValueError as exc:  # unreadable or inconsistent sample: reported, not fatal
            failed.append({"name": item.name, "error": str(exc)})
            tqdm.write(f"skipped {item.name}: {exc}", file=sys.stderr)
            continue
        engine_ms.append(result.timings["total"])
        if predictions_dir is not None:
            save_prediction(predictions_dir, item.name, rgb, pred, gt, vocabulary)
        bar.set_postfix(mIoU=f"{100 * matrix.summary()['mIoU']:.1f}", refresh=False)
    seconds = time.perf_counter() - start
    return build_report(
        segmenter, dataset, vocabulary, matrix, len(items), failed, seconds, engine_ms, limit
    )


def _pct(value: float) -> float | None:
    """A fraction as a percentage; None (JSON null) for NaN."""
    return None if math.isnan(value) else 100.0 * float(value)


def build_report(
    segmenter: Segmenter,
    dataset: Dataset,
    vocabulary: EvalVocabulary,
    matrix: ConfusionMatrix,
    attempted: int,
    failed: list[dict[str, str]],
    seconds: float,
    engine_ms: list[float],
    limit: int | None,
) -> dict[str, Any]:
    """The JSON-ready report: dataset, vocabulary, effective config, model, metrics, timing."""
    cfg = segmenter.config
    iou, acc = matrix.iou(), matrix.accuracy()
    gt_px, pred_px = matrix.gt_pixels, matrix.pred_pixels
    summary = matrix.summary()
    return {
        "dataset": {
            "name": dataset.name,
            "title": dataset.title,
            "root": str(dataset.root),
            "layout": dataset.layout,
            "images_found": len(dataset),
            "limit": limit,
        },
        "vocabulary": {
            **vocabulary.to_dict(),
            "background_words": list(segmenter.vocabulary.background_words),
            "templates": segmenter.vocabulary.templates,
        },
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _VOCABULARY_FIELDS},
        "model": {
            "name": cfg.model_name,
            "weights": segmenter.backbone.source,
            "device": str(segmenter.device),
            "dtype": str(segmenter.backbone.dtype).removeprefix("torch."),
        },
        "images": attempted - len(failed),
        "failed": failed,
        "metrics": {
            "mIoU": _pct(summary["mIoU"]),
            "mAcc": _pct(summary["mAcc"]),
            "aAcc": _pct(summary["aAcc"]),
            "classes": [
                {
                    "id": i,
                    "name": name,
                    "IoU": _pct(iou[i]),
                    "Acc": _pct(acc[i]),
                    "gt_pixels": int(gt_px[i]),
                    "pred_pixels": int(pred_px[i]),
                }
                for i, name in enumerate(vocabulary.names)
            ],
        },
        "seconds": round(seconds, 3),
        "engine_ms_per_image": round(float(np.mean(engine_ms)), 1) if engine_ms else None,
    }


def _num(value: float | None) -> str:
    """A percentage for the table; '–' for n/a."""
    return "–" if value is None else f"{value:.2f}"


def settings_line(report: dict[str, Any]) -> str:
    """One line with the settings that decide the numbers."""
    cfg, model, voc = report["config"], report["model"], report["vocabulary"]
    mode = cfg["mode"] + (f" {cfg['crop']}/{cfg['stride']}" if cfg["mode"] == "slide" else "")
    params = ", ".join(f"{k}={v}" for k, v in cfg["method_params"].items())
    words = len(voc["background_words"])
    if voc["background_class"] is not None:
        name = voc["classes"][voc["background_class"]]["name"]
        background = f"{words} background words -> class {name!r}"
    else:
        background = f"{words} background words, " if words else ""
        background += "no background class (an unlabeled pixel is a miss)"
    parts = [
        f"{cfg['method']}" + (f" ({params})" if params else ""),
        f"{model['name']} ({model['weights']}) on {model['device']} {model['dtype']}",
        f"short side {cfg['short_side']}, {mode}",
        f"templates {voc['templates']}",
        f"prob threshold {cfg['prob_threshold']}",
        f"area threshold {cfg['area_threshold']}",
        f"refine {cfg['refine']}",
        background,
    ]
    return " · ".join(parts)


def to_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a heading, the settings, a class | IoU | Acc table, a summary."""
    ds, m = report["dataset"], report["metrics"]
    lines = [
        f"## ovseg eval: {ds['title']}, {report['images']} image(s)",
        "",
        settings_line(report),
        "",
        "| class | IoU | Acc |",
        "|---|---:|---:|",
    ]
    lines += [f"| {c['name']} | {_num(c['IoU'])} | {_num(c['Acc'])} |" for c in m["classes"]]
    per_image = report["seconds"] / report["images"] if report["images"] else float("nan")
    timing = f"{report['seconds']:.1f} s ({per_image:.2f} s/image"
    if "setup_seconds" in report:
        timing += f"; model and prompts {report['setup_seconds']:.1f} s"
    lines += [
        f"| **mean** | **{_num(m['mIoU'])}** | **{_num(m['mAcc'])}** |",
        "",
        f"**mIoU {_num(m['mIoU'])}** · mAcc {_num(m['mAcc'])} · aAcc {_num(m['aAcc'])} · "
        f"{report['images']} image(s) of {ds['images_found']} in {ds['root']} · {timing}). "
        "– = class in neither ground truth nor prediction (left out of the means).",
    ]
    if report["failed"]:
        lines += [
            "",
            f"{len(report['failed'])} image(s) could not be evaluated: "
            + "; ".join(f"{f['name']} ({f['error']})" for f in report["failed"]),
        ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write eval.json and eval.md into out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "eval.json", out_dir / "eval.md"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    md_path.write_text(to_markdown(report))
    return json_path, md_path


def _label_image(ids: np.ndarray, num_classes: int) -> np.ndarray:
    """Dataset ids (255 = none) as the uint8 / uint16 label map the viz helpers take."""
    if num_classes < IGNORE_INDEX:
        return ids.astype(np.uint8)
    return np.where(ids == IGNORE_INDEX, 65535, ids).astype(np.uint16)


def save_prediction(
    out_dir: Path,
    name: str,
    rgb: np.ndarray,
    pred: np.ndarray,
    gt: np.ndarray,
    vocabulary: EvalVocabulary,
) -> Path:
    """Write <name>.png: the prediction overlay beside the ground-truth overlay."""
    colors = palette(vocabulary.num_classes)
    n = vocabulary.num_classes
    left = overlay(rgb, _label_image(pred, n), colors, 0.6, vocabulary.names)
    right = overlay(rgb, _label_image(gt, n), colors, 0.6, vocabulary.names)
    path = out_dir / f"{name.replace('/', '_')}.png"
    cv2.imwrite(str(path), cv2.cvtColor(np.hstack([left, right]), cv2.COLOR_RGB2BGR))
    return path
