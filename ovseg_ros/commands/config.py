"""The engine's flags: one per SegmenterConfig field plus --param, the config they give, and the
Segmenter built from it (shared by `ovseg segment`, `ovseg bench` and `ovseg eval`)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from ..engine import ModelLoadError, Segmenter, SegmenterConfig
from ..engine.config import parameter_fields
from ..engine.segmenter import load_backbone

log = logging.getLogger("ovseg_ros.cli")

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
