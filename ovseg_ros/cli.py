"""`ovseg`: segment images from the command line (`ovseg segment`, `ovseg methods`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .engine import ModelLoadError, Segmenter, SegmenterConfig, describe_methods
from .engine.config import parameter_fields
from .engine.segmenter import load_backbone
from .viz import class_colors, overlay

log = logging.getLogger("ovseg_ros.cli")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

#: Short flags for the most used parameters, besides the long form derived from each name.
ALIASES: dict[str, list[str]] = {
    "model.name": ["--model"],
    "model.pretrained": ["--pretrained"],
    "model.checkpoint": ["--checkpoint"],
    "vocabulary": ["--classes"],
    "input.short_side": ["--short-side"],
    "inference.mode": ["--mode"],
    "inference.crop": ["--crop"],
    "inference.stride": ["--stride"],
}


def _flag(key: str) -> str:
    """'input.short_side' -> '--input-short-side'."""
    return "--" + key.replace(".", "-").replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per SegmenterConfig field (defaults stay in the dataclass), plus --param."""
    group = parser.add_argument_group("segmentation parameters (defaults in brackets)")
    defaults = SegmenterConfig()
    for f in parameter_fields():
        meta = f.metadata
        if f.name == "method_params":
            continue
        default = getattr(defaults, f.name)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        shown = (
            default
            if not isinstance(default, list)
            else (f"{len(default)} entries" if default else "none")
        )
        kwargs["help"] = f"{meta['help']} [{shown}]"
        if isinstance(default, list):
            kwargs["nargs"] = "*"
            kwargs["metavar"] = "NAME"
        elif isinstance(default, bool):
            kwargs["type"] = lambda s: s.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int | float):
            kwargs["type"] = type(default)
        if meta["choices"]:
            kwargs["choices"] = list(meta["choices"])
        group.add_argument(*ALIASES.get(meta["key"], []), _flag(meta["key"]), **kwargs)
    group.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="method hyper-parameter override, repeatable (see `ovseg methods`)",
    )


def config_from_args(args: argparse.Namespace) -> SegmenterConfig:
    """A validated SegmenterConfig from parsed flags (unset flags keep the defaults)."""
    names = {f.name for f in parameter_fields()}
    changes = {k: v for k, v in vars(args).items() if k in names}
    params: dict[str, Any] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param takes NAME=VALUE, got {item!r}")
        params[key.strip()] = value.strip()
    if params:
        changes["method_params"] = params
    return dataclasses.replace(SegmenterConfig(), **changes).validate()


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


def load_segmenter(cfg: SegmenterConfig, fallback_random: bool) -> Segmenter:
    """Build the Segmenter; with fallback_random, missing weights degrade to random ones loudly."""
    try:
        backbone = load_backbone(cfg)
    except ModelLoadError as exc:
        if not fallback_random:
            raise
        log.warning("%s", exc)
        log.warning(
            "--fallback-random: continuing with RANDOM weights; the labels will be "
            "meaningless, but the whole pipeline runs"
        )
        cfg = dataclasses.replace(cfg, model_pretrained="none", model_checkpoint="")
        backbone = load_backbone(cfg)
    return Segmenter(cfg, backbone=backbone, progress=_text_progress())


def _text_progress():
    """A progress callback for text encoding that draws a tqdm bar on stderr."""
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc="encoding prompts", unit="prompt", leave=False)
        bar["bar"].update(done - bar["bar"].n)
        if done >= total:
            bar.pop("bar").close()

    return update


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
        from .samples import sample_images

        _SAMPLES_CACHE = sample_images()
    return _SAMPLES_CACHE


_SAMPLES_CACHE: list[tuple[str, np.ndarray]] | None = None


def cmd_methods(args: argparse.Namespace) -> int:
    """Print every registered method with its summary and default hyper-parameters."""
    for m in describe_methods():
        params = ", ".join(f"{k}={v}" for k, v in m["params"].items())
        print(f"{m['name']:<10} {m['summary']}\n{'':<10} {params}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Engine matrix, step breakdown and text timings (or the node bench with --node)."""
    import shlex
    import time

    from .bench import (
        DEFAULT_METHODS,
        format_engine_bench,
        parse_size,
        run_engine_bench,
        write_outputs,
    )
    from .engine import available_methods

    cfg = config_from_args(args)
    sizes = [parse_size(s) for s in args.sizes]
    # The command line as typed (recorded in bench.md / bench.json); empty when called from Python.
    typed = Path(sys.argv[0]).name in ("ovseg", "cli.py", "__main__.py")
    command = "ovseg " + shlex.join(sys.argv[1:]) if typed else ""
    date = time.strftime("%Y-%m-%d")
    progress = None if args.quiet else (lambda text: print(f"... {text}", file=sys.stderr))
    if args.against:
        from .bench_revision import format_against, run_against

        # Only the flags given: the other revision may not know every field of this one.
        given = {k: v for k, v in vars(args).items() if k in {f.name for f in parameter_fields()}}
        if cfg.method_params:
            given["method_params"] = cfg.method_params
        repo = Path(__file__).resolve().parents[1]
        result = run_against(repo, args.against, given, args.variants, sizes[0], args.repeats)
        print(format_against(result))
        return 0
    if args.node:
        from .ros.bench_node import format_node_bench, run_node_bench, write_node_outputs

        result = run_node_bench(
            cfg, sizes[0], args.frames, duration=args.duration, rate=args.rate, progress=progress
        )
        print(format_node_bench(result))
        if args.out:
            for path in write_node_outputs(result, Path(args.out), command, date).values():
                print(f"wrote {path}", file=sys.stderr)
        return 0
    if not args.methods:
        methods = list(DEFAULT_METHODS)
    elif args.methods == ["all"]:
        methods = available_methods()
    else:
        methods = args.methods
    bench = run_engine_bench(
        cfg,
        methods,
        args.modes,
        sizes,
        args.repeats,
        None if args.text_templates == "none" else args.text_templates,
        devices=args.devices,
        precisions=args.precisions,
        quantize=args.bench_quantize,
        compile_modes=args.bench_compile,
        threads=args.bench_threads,
        warmup=args.warmup,
        seed=args.seed,
        agreement_frames=args.agreement_frames,
        steps_size=None if args.steps_size == "none" else parse_size(args.steps_size),
        progress=progress,
    )
    print(format_engine_bench(bench))
    if args.out:
        for path in write_outputs(bench, Path(args.out), command, date).values():
            print(f"wrote {path}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `ovseg` argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="ovseg", description="Training-free open-vocabulary segmentation with CLIP."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    seg = sub.add_parser(
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
    bench = sub.add_parser(
        "bench",
        help="time the methods, the frame's steps and the text encoder (or the node) here",
        description="Engine: one row per method x size x mode x variant (device, precision, "
        "quantize, compile, threads; impossible combinations are skipped with a note), then the "
        "steps of one frame and the text encoder. --node: the ROS node against the bare engine "
        "(one frame at a time) and under a stream of frames. --out DIR also writes JSON, "
        "Markdown and a PNG plot.",
    )
    bench.add_argument(
        "--sizes",
        "--size",
        nargs="+",
        default=["640x480"],
        metavar="WxH",
        help="input frame sizes [640x480]",
    )
    bench.add_argument(
        "--methods",
        nargs="*",
        metavar="NAME",
        help="methods to time, or 'all' [pearl naclip sclip clearclip maskclip clip]",
    )
    bench.add_argument(
        "--modes", nargs="+", default=["whole"], choices=["whole", "slide"], help="[whole]"
    )
    bench.add_argument(
        "--devices",
        nargs="+",
        metavar="DEV",
        help="devices (cpu, cuda, cuda:N, auto; an absent one is skipped) [--device]",
    )
    bench.add_argument(
        "--precisions",
        nargs="+",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="precisions (invalid pairs such as fp16 on the CPU are skipped) [--precision]",
    )
    bench.add_argument(
        "--quantize",
        dest="bench_quantize",
        nargs="+",
        choices=["none", "int8"],
        help="quantisation variants [--model-quantize]",
    )
    bench.add_argument(
        "--compile",
        dest="bench_compile",
        nargs="+",
        choices=["none", "default", "reduce-overhead", "max-autotune"],
        help="torch.compile variants [--model-compile]",
    )
    bench.add_argument(
        "--threads",
        dest="bench_threads",
        nargs="+",
        type=int,
        metavar="N",
        help="torch CPU thread counts, 0 = torch's default [--cpu-threads]",
    )
    bench.add_argument("--repeats", type=int, default=5, help="timed frames per row [5]")
    bench.add_argument("--warmup", type=int, default=1, help="untimed frames per row [1]")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random frames [0]")
    bench.add_argument(
        "--agreement-frames",
        type=int,
        default=3,
        help="sample photos for the label agreement against fp32 eager (0 = off) [3]",
    )
    bench.add_argument(
        "--steps-size",
        default="640x480",
        metavar="WxH",
        help="frame size of the per-step breakdown, or 'none' [640x480]",
    )
    bench.add_argument(
        "--text-templates",
        default="seven",
        choices=["none", "single", "seven", "imagenet80"],
        help="template set of the text-encoding timing, 20 classes [seven]",
    )
    bench.add_argument("--out", help="also write bench.json, bench.md, bench.png here")
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    bench.add_argument(
        "--node",
        action="store_true",
        help="time the ROS node end to end against the bare engine instead (same run)",
    )
    bench.add_argument(
        "--frames", type=int, default=10, help="--node: frames sent one at a time [10]"
    )
    bench.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="--node: seconds of streaming at --rate (0 = no streaming phase) [10]",
    )
    bench.add_argument("--rate", type=float, default=30.0, help="--node: stream rate in Hz [30]")
    bench.add_argument(
        "--against",
        metavar="REV",
        help="time this checkout against git revision REV (e.g. a release tag) in one run: "
        "worker processes take frames in turn; segment + overlay per frame, --repeats rounds",
    )
    bench.add_argument(
        "--variants",
        nargs="*",
        default=[],
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="--against: configs of this checkout to time too, e.g. precision=bf16 quantize=int8",
    )
    add_config_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    meth = sub.add_parser("methods", help="list the methods and their hyper-parameters")
    meth.set_defaults(func=cmd_methods)
    from .ros import demo  # light: the node and rclpy are imported when the demo runs

    demo_parser = sub.add_parser(
        "demo",
        help="run the ROS node with a sample camera on this host (what `make run` starts)",
        description=(demo.__doc__ or "").split("\n\n")[1],
    )
    demo.build_parser(demo_parser)
    demo_parser.set_defaults(func=demo.run)
    from .evaluation.cli import add_eval_parser  # here: evaluation.cli imports this module

    add_eval_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ovseg` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s"
    )
    logging.getLogger().handlers[0].setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
