"""Segmenter configuration: one dataclass whose fields the CLI, the YAML file and the node share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Background words of SCLIP / NACLIP / ProxyCLIP (METHODS.md section 1).
DEFAULT_BACKGROUND_WORDS: tuple[str, ...] = (
    "sky",
    "wall",
    "tree",
    "wood",
    "grass",
    "road",
    "sea",
    "river",
    "mountain",
    "sands",
    "desk",
    "bed",
    "building",
    "cloud",
    "lamp",
    "door",
    "window",
    "wardrobe",
    "ceiling",
    "shelf",
    "curtain",
    "stair",
    "floor",
    "hill",
    "rail",
    "fence",
)

#: Default vocabulary: a few everyday objects, used only where nothing else is configured.
DEFAULT_VOCABULARY: tuple[str, ...] = (
    "person; astronaut",
    "cat",
    "dog",
    "coffee cup; mug",
    "rocket",
    "motorcycle; motorbike",
    "car",
    "chair",
    "table",
    "potted plant; plant",
    "flag",
)

DEVICES_HELP = "auto (CUDA if available, else CPU), cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
TEMPLATE_SETS = ("imagenet80", "seven", "single")
REFINERS = ("none", "pamr")
MODES = ("whole", "slide")
QUANTIZE = ("none", "int8")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
_TOKENS_WHY = (
    "beyond 1024 pixels one ViT pass would see more than 4096 patches, and its attention "
    "memory grows with their square"
)


def _opt(
    key: str,
    help: str,
    choices: tuple[str, ...] = (),
    lo: float | None = None,
    hi: float | None = None,
    runtime: bool = False,
    why: str = "",
) -> dict[str, Any]:
    """Field metadata: dotted parameter name, description, allowed values, run-time changeable.

    `why` explains the range in the error a value outside it gets.
    """
    return {
        "key": key,
        "help": help,
        "choices": choices,
        "lo": lo,
        "hi": hi,
        "runtime": runtime,
        "why": why,
    }


@dataclass
class SegmenterConfig:
    """Everything a Segmenter needs; each field maps to one dotted parameter name (metadata key)."""

    model_name: str = field(
        default="ViT-B-16",
        metadata=_opt("model.name", "open_clip architecture name (a ViT, e.g. ViT-B-16, ViT-L-14)"),
    )
    model_pretrained: str = field(
        default="openai",
        metadata=_opt(
            "model.pretrained",
            "open_clip pretrained tag (downloaded once into model.cache_dir); "
            "'none' = random weights for smoke tests",
        ),
    )
    model_checkpoint: str = field(
        default="",
        metadata=_opt(
            "model.checkpoint",
            "local weights file (open_clip state dict, or an original OpenAI "
            "CLIP .pt as JIT archive or state dict); overrides model.pretrained",
        ),
    )
    model_cache_dir: str = field(
        default="",
        metadata=_opt(
            "model.cache_dir",
            "where pretrained weights are downloaded / looked up ('' = open_clip's default cache)",
        ),
    )
    device: str = field(default="auto", metadata=_opt("device", DEVICES_HELP))
    precision: str = field(
        default="auto",
        metadata=_opt(
            "precision",
            "auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 (CUDA only) or bf16",
            choices=PRECISIONS,
        ),
    )
    quantize: str = field(
        default="none",
        metadata=_opt(
            "model.quantize",
            "int8: dynamic int8 quantisation of the ViT's linear layers (CPU only; faster, "
            "labels differ slightly from fp32, see BENCHMARKS.md); none: off",
            choices=QUANTIZE,
        ),
    )
    compile: str = field(
        default="none",
        metadata=_opt(
            "model.compile",
            "torch.compile the ViT blocks before the last (the first frame of each size "
            "compiles, which takes a while; reduce-overhead adds CUDA graphs on a GPU); none: off",
            choices=COMPILE_MODES,
        ),
    )
    threads: int = field(
        default=0,
        metadata=_opt(
            "cpu.threads",
            "torch threads for CPU inference (0 = torch's default, one per core); the setting "
            "is per process",
            lo=0,
            hi=1024,
        ),
    )
    method: str = field(
        # PEARL: the strongest CLIP-only method, within 1.2x NACLIP's CPU cost (BENCHMARKS.md,
        # "PEARL vs NACLIP"); NACLIP is `method: naclip`.
        default="pearl",
        metadata=_opt("method", "segmentation method (registry name)", runtime=True),
    )
    method_params: dict[str, Any] = field(
        default_factory=dict,
        metadata=_opt(
            "method_params",
            "overrides of the method's hyper-parameters (name -> value)",
            runtime=True,
        ),
    )
    vocabulary: list[str] = field(
        default_factory=lambda: list(DEFAULT_VOCABULARY),
        metadata=_opt(
            "vocabulary", "class names; an entry may hold synonyms separated by ';'", runtime=True
        ),
    )
    background_words: list[str] = field(
        default_factory=lambda: list(DEFAULT_BACKGROUND_WORDS),
        metadata=_opt(
            "background_words",
            "words whose pixels become unlabeled (a word that is also a "
            "vocabulary class is dropped from this list); [] = none",
            runtime=True,
        ),
    )
    templates: str = field(
        default="imagenet80",
        metadata=_opt("templates", "prompt template set", choices=TEMPLATE_SETS, runtime=True),
    )
    prob_threshold: float = field(
        default=0.0,
        metadata=_opt(
            "prob_threshold",
            "pixels whose best class probability is below this become unlabeled (0 = off)",
            lo=0.0,
            hi=1.0,
            runtime=True,
        ),
    )
    area_threshold: float = field(
        default=0.0,
        metadata=_opt(
            "area_threshold",
            "classes covering less than this fraction of the labelled pixels are "
            "suppressed (0 = off)",
            lo=0.0,
            hi=1.0,
            runtime=True,
        ),
    )
    refine: str = field(
        default="none",
        metadata=_opt("refine", "post-refinement of the logits", choices=REFINERS, runtime=True),
    )
    short_side: int = field(
        default=336,
        metadata=_opt(
            "input.short_side",
            "the image is resized (aspect kept) so its short side is this many "
            "pixels before inference; at most 1024: one ViT pass sees at most 4096 patches "
            "(a whole-image pass beyond that is shrunk to fit)",
            lo=16,
            hi=1024,
            why=_TOKENS_WHY,
            runtime=True,
        ),
    )
    mode: str = field(
        default="whole",
        metadata=_opt(
            "inference.mode",
            "whole: one pass over the resized image; slide: overlapping crops",
            choices=MODES,
            runtime=True,
        ),
    )
    crop: int = field(
        default=224,
        metadata=_opt(
            "inference.crop",
            "slide window size in pixels; at most 1024 (4096 patches at patch 16)",
            lo=16,
            hi=1024,
            runtime=True,
            why=_TOKENS_WHY,
        ),
    )
    stride: int = field(
        default=112,
        metadata=_opt(
            "inference.stride", "slide window stride in pixels", lo=1, hi=4096, runtime=True
        ),
    )
    max_batch: int = field(
        default=16,
        metadata=_opt(
            "inference.max_batch",
            "most crops sent through the model at once",
            lo=1,
            hi=1024,
            runtime=True,
        ),
    )
    text_cache_dir: str = field(
        default="",
        metadata=_opt(
            "text.cache_dir",
            "disk cache of text embeddings ('' = ~/.cache/ovseg_ros/text, 'none' = no disk "
            "cache; 'off' also works where YAML does not turn it into false)",
        ),
    )

    def validate(self) -> SegmenterConfig:
        """Check every field against its metadata; raise ValueError naming the parameter."""
        check_fields(self)
        if self.mode == "slide" and self.stride > self.crop:
            raise ValueError(
                f"inference.stride ({self.stride}) must not exceed inference.crop ({self.crop}), "
                "or parts of the image would never be seen"
            )
        if not isinstance(self.method_params, dict):
            raise ValueError("method_params must be a mapping of name -> value")
        from .methods import make_params

        make_params(self.method, self.method_params)  # unknown method or hyper-parameter
        return self

    def replace(self, **changes: Any) -> SegmenterConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes).validate()

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> SegmenterConfig:
        """Build from dotted parameter names; 'method_params.x' entries go to the dict."""
        by_key = {f.metadata["key"]: f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        method_params: dict[str, Any] = {}
        for key, value in params.items():
            if key.startswith("method_params."):
                method_params[key.split(".", 1)[1]] = value
            elif key in by_key:
                kwargs[by_key[key]] = value
            else:
                raise ValueError(f"unknown parameter {key!r}; known: {sorted(by_key)}")
        if method_params:
            kwargs["method_params"] = {**kwargs.get("method_params", {}), **method_params}
        return cls(**kwargs).validate()


def check_fields(obj: Any) -> None:
    """Check a dataclass built with _opt metadata against its choices and ranges."""
    for f in dataclasses.fields(obj):
        meta = f.metadata
        value = getattr(obj, f.name)
        key = meta["key"]
        if meta["choices"] and value not in meta["choices"]:
            raise ValueError(f"{key} must be one of {list(meta['choices'])}, got {value!r}")
        if meta["lo"] is not None and not (meta["lo"] <= value <= meta["hi"]):
            why = f" ({meta['why']})" if meta.get("why") else ""
            raise ValueError(f"{key} must be in [{meta['lo']}, {meta['hi']}], got {value!r}{why}")


def parameter_fields() -> list[dataclasses.Field]:
    """The config fields in declaration order (for the CLI and the node)."""
    return list(dataclasses.fields(SegmenterConfig))
