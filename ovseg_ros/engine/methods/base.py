"""Method protocol and registry: name -> method class with its published hyper-parameters."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..backbone import Backbone
from ..text import Vocabulary

if TYPE_CHECKING:
    from ..labeling import DenseMaps


@dataclass
class MethodParams:
    """Hyper-parameters every method has."""

    logit_scale: float = 40.0  # temperature of softmax(logit_scale * cos) over the queries


class Method:
    """A dense open-vocabulary method: normalised images in, per-query patch logits out."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    summary: ClassVar[str] = ""
    #: Whether the engine calls pixel_logits on the upsampled maps (see there).
    has_pixel_step: ClassVar[bool] = False
    #: Whether inference.dense_maps hands the frame's maps to frame_maps (may depend on params).
    has_frame_step: bool = False

    def __init__(self, params: MethodParams) -> None:
        """Keep the validated hyper-parameters."""
        self.params = params

    # Lifecycle. The Segmenter calls prepare() on a new method before swapping it in (outside its
    # lock, so the previous method keeps serving frames meanwhile) and release() on the old one
    # once no frame uses it any more. Methods with auxiliary models (a DINO proxy, Stable
    # Diffusion) load them in prepare() and drop them in release(); both must be idempotent.

    def prepare(self, backbone: Backbone) -> None:
        """Load what the method needs besides the backbone (ModelLoadError if it cannot)."""

    def release(self) -> None:
        """Free what prepare() loaded; the method may be prepared again afterwards."""

    def bind_vocabulary(self, vocab: Vocabulary) -> None:
        """Precompute what depends only on the vocabulary (the Segmenter calls it on a change).

        Called before a vocabulary is swapped in (and for a new method with the current one), so
        per-frame work can look the result up; a frame whose vocabulary was not bound must still
        work (computing it then). Must be thread-safe and cheap to repeat for the same vocab.
        """

    def token_patch(self, backbone: Backbone) -> int:
        """The finest patch (pixels) of any transformer this method runs: bounds its token count."""
        return backbone.patch_size

    @staticmethod
    def record_timing(key: str, ms: float) -> None:
        """Add ms to the frame's extra timing `key` (summed over crops; see collect_timings)."""
        sink = getattr(_timings, "sink", None)
        if sink is not None:
            sink[key] = sink.get(key, 0.0) + ms

    def logits(self, backbone: Backbone, images: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """(B, Q, h, w) float32 logits of normalised (B, 3, H, W) images (patch multiples)."""
        raise NotImplementedError

    def pixel_logits(
        self, up: torch.Tensor, grid: torch.Tensor, queries: slice, vocab: Vocabulary
    ) -> torch.Tensor:
        """Logits from this method's outputs once upsampled (methods with has_pixel_step only).

        `up` is (qc, H, W): the outputs of vocab's queries[queries], bilinearly upsampled to the
        frame's size (whole mode) or to the crop's size (slide mode, before crops are averaged);
        `grid` is the same queries' (qc, h, w) outputs as logits() returned them. The engine then
        takes the softmax over queries and the argmax of the returned logits. A method whose
        labelling needs the full-resolution map of a query (its spatial maximum, say) does it here.
        """
        raise NotImplementedError

    def frame_maps(
        self, maps: DenseMaps, image: torch.Tensor, frame_size: tuple[int, int]
    ) -> DenseMaps:
        """The frame's maps after a step that needs all crops and queries (has_frame_step only).

        `maps` are the crops' outputs of the normalised model input `image` (1, 3, H', W'), which
        will be labelled at `frame_size`. PEARL's propagation stitches them onto its own grid.
        """
        raise NotImplementedError

    @staticmethod
    def patch_logits(
        features: torch.Tensor, grid: tuple[int, int], vocab: Vocabulary, scale: float
    ) -> torch.Tensor:
        """scale * cos(patch feature, query) from (B, h*w, D) features -> (B, Q, h, w)."""
        logits = scale * features @ vocab.embeddings.T.to(features.dtype)
        b = logits.shape[0]
        return logits.transpose(1, 2).reshape(b, -1, grid[0], grid[1])


#: Per-thread sink of Method.record_timing (a frame runs on one thread; frames may run in parallel).
_timings = threading.local()


@contextlib.contextmanager
def collect_timings() -> Iterator[dict[str, float]]:
    """Collect, for the calling thread, the extra timings (ms) methods record inside the block.

    Segmenter.segment wraps one frame's forward pass in this and merges the dict into
    Result.timings. The timings are parts of the frame's "model" time, not additions to it.
    """
    previous = getattr(_timings, "sink", None)
    sink: dict[str, float] = {}
    _timings.sink = sink
    try:
        yield sink
    finally:
        _timings.sink = previous


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under cls.name."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registry names, sorted."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered under name; ValueError lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {available_methods()}") from None


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert an override to the type of the default (ROS and the CLI pass strings/floats)."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "1",
            "yes",
            "on",
            "false",
            "0",
            "no",
            "off",
        ):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        raise ValueError(f"method parameter {key!r} must be true or false, got {value!r}")
    if kind in (int, float):
        try:
            converted = kind(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"method parameter {key!r} must be a {kind.__name__}, got {value!r}"
            ) from None
        if kind is int and isinstance(value, float) and value != converted:
            raise ValueError(f"method parameter {key!r} must be an integer, got {value!r}")
        return converted
    if kind is str:
        return str(value)
    return value


def make_params(name: str, overrides: Mapping[str, Any] | None = None) -> MethodParams:
    """The method's published defaults with overrides applied and type-checked."""
    cls = method_class(name)
    defaults = cls.Params()
    fields = {f.name: f for f in dataclasses.fields(defaults)}
    changes = {}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ValueError(
                f"method {name!r} has no parameter {key!r}; its parameters: {sorted(fields)}"
            )
        changes[key] = _coerce(key, value, getattr(defaults, key))
    params = dataclasses.replace(defaults, **changes)
    check: Callable[[], None] | None = getattr(params, "check", None)
    if check is not None:
        check()
    return params


def create_method(name: str, overrides: Mapping[str, Any] | None = None) -> Method:
    """Instantiate a registered method with its defaults and the given overrides."""
    return method_class(name)(make_params(name, overrides))


def describe_methods() -> list[dict[str, Any]]:
    """Name, summary and default hyper-parameters of every method (for --help and docs)."""
    return [
        {"name": n, "summary": c.summary, "params": dataclasses.asdict(c.Params())}
        for n, c in sorted(_REGISTRY.items())
    ]
