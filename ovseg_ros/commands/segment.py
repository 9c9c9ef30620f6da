"""`ovseg segment`: segment image files, folders or the sample photos; write labels, overlays and
JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..viz import class_colors, overlay
from .config import add_config_arguments, config_from_args, load_segmenter

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def iter_images(paths: Sequence[str]) -> Iterator[Path]:
    """Expand files and folders (their image files, sorted) in the order given."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB; ValueError if it cannot be decoded."""
    data = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if data is None:
        raise ValueError(f"cannot read {path} as an image")
    return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)


def write_outputs(
    out_dir: Path, stem: str, rgb: np.ndarray, result, alpha: float, extra: dict[str, Any]
) -> dict[str, str]:
    """Write <stem>_labels.png, <stem>_overlay.png and <stem>.json; return their paths."""
    vocab = result.vocabulary
    colors = class_colors(vocab.num_classes)
    labels_path = out_dir / f"{stem}_labels.png"
    overlay_path = out_dir / f"{stem}_overlay.png"
    json_path = out_dir / f"{stem}.json"
    cv2.imwrite(str(labels_path), result.labels)
    blended = overlay(rgb, result.labels, colors, alpha=alpha, names=vocab.names)
    cv2.imwrite(str(overlay_path), cv2.cvtColor(blended, cv2.COLOR_RGB2BGR))
    summary = {**extra, **result.summary(), "vocabulary": vocab.to_dict(colors)}
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return {"labels": str(labels_path), "overlay": str(overlay_path), "json": str(json_path)}


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment every image given (or the bundled samples) and write labels, overlays, JSON."""
    from tqdm import tqdm

    cfg = config_from_args(args)
    inputs: list[tuple[str, Path | None]] = [(p.stem, p) for p in iter_images(args.images)]
    if args.samples:
        inputs += [(name, None) for name in _sample_names()]
    if not inputs:
        print("error: no images given (pass files or folders, or --samples)", file=sys.stderr)
        return 2
    segmenter = load_segmenter(cfg, args.fallback_random)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = dict(_load_samples()) if args.samples else {}
    failures = 0
    extra_base = {
        "method": segmenter.config.method,
        "model": segmenter.config.model_name,
        "weights": segmenter.backbone.source,
        "device": str(segmenter.device),
    }
    bar = tqdm(inputs, desc="segmenting", unit="image", disable=args.quiet)
    for stem, path in bar:
        try:
            rgb = samples[stem] if path is None else read_rgb(path)
            result = segmenter.segment(rgb)
        except (ValueError, OSError) as exc:
            failures += 1
            tqdm.write(f"skipped {path or stem}: {exc}", file=sys.stderr)
            continue
        written = write_outputs(
            out_dir,
            stem,
            rgb,
            result,
            args.alpha,
            {**extra_base, "image": str(path or f"skimage:{stem}")},
        )
        names = result.vocabulary.names
        seen = ", ".join(f"{names[i]} {result.fractions[i]:.0%}" for i in result.present()[:5])
        if not args.quiet:
            tqdm.write(
                f"{stem}: {result.timings['total']:.0f} ms, {seen or 'nothing labelled'}"
                f" -> {written['overlay']}"
            )
    print(
        f"wrote {len(inputs) - failures} result(s) to {out_dir}"
        + (f"; {failures} image(s) skipped" if failures else "")
    )
    return 1 if failures else 0


def _sample_names() -> list[str]:
    """Names of the bundled sample photos."""
    return [name for name, _ in _load_samples()]


def _load_samples() -> list[tuple[str, np.ndarray]]:
    """The scikit-image sample photos (cached for the process)."""
    global _SAMPLES_CACHE
    if _SAMPLES_CACHE is None:
        from ..samples import sample_images

        _SAMPLES_CACHE = sample_images()
    return _SAMPLES_CACHE


_SAMPLES_CACHE: list[tuple[str, np.ndarray]] | None = None


def add_segment_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `segment` sub-command to the `ovseg` parser."""
    seg = subparsers.add_parser(
        "segment",
        help="segment image files, folders or the sample photos",
        description="Write <name>_labels.png (class ids, 255 = unlabeled), "
        "<name>_overlay.png and <name>.json for every image.",
    )
    seg.add_argument("images", nargs="*", help="image files or folders of images")
    seg.add_argument(
        "--samples",
        action="store_true",
        help="also segment the sample photos bundled with scikit-image",
    )
    seg.add_argument("--out", default="out", help="output folder [out]")
    seg.add_argument("--alpha", type=float, default=0.5, help="overlay opacity [0.5]")
    seg.add_argument(
        "--fallback-random",
        action="store_true",
        help="if the weights cannot be loaded, warn and use random weights",
    )
    seg.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    add_config_arguments(seg)
    seg.set_defaults(func=cmd_segment)
    return seg
