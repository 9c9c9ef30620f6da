"""What a set of CLIP weights is: a local file read, its image tower's shape and its activation.

This module reads local weights files (open_clip state dicts, .safetensors, OpenAI TorchScript
archives) into a state dict, tells what they hold (the ViT's shape, QuickGELU or GELU) and picks
the open_clip architecture that fits them; building the model from them is clip_loading's.

Weights that do not fit. open_clip builds what model.name says and would load a state dict of the
same tensor shapes trained with the other activation (QuickGELU vs GELU) without a word, or resize
a positional table of another input size. The loader therefore:

- pretrained tags: builds the architecture with the activation the open_clip registry gives for
  the tag (e.g. ViT-B-16 + openai -> QuickGELU), with an info line when model.name differs;
- OpenAI files (TorchScript archive, or state dict with input_resolution): QuickGELU and the
  architecture read from the file, with an info line naming it;
- open_clip state dicts (no marker in the file): the shape (width, patch, input size, layers,
  embedding) must match model.name, or one sentence names architectures that fit; the activation
  comes from the file's provenance (an open_clip_config.json beside it, a Hugging Face cache path
  or a file name of the open_clip registry), else from model.pretrained when it is a known tag
  (naming where the weights came from), else from model.name when that is unambiguous (a
  "-quickgelu" name, or one without a QuickGELU/GELU twin); anything else is refused with one
  sentence naming the fix;
- unreadable files, folders, empty or corrupt files: one sentence each.
"""

from __future__ import annotations

import json
import logging
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("ovseg_ros.engine")

#: open_clip's names for the QuickGELU variant of a GELU architecture end with this.
QUICKGELU_SUFFIX = "-quickgelu"


class ModelLoadError(RuntimeError):
    """The model or its weights could not be loaded; the message says why and what to do."""


def _is_jit_archive(path: Path) -> bool:
    """True for a TorchScript archive (the original OpenAI CLIP release format)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _first_line(exc: BaseException) -> str:
    """An exception's class and the first line of its cause (torch's messages run long)."""
    text = str(exc)
    # torch's weights_only failures open with paragraphs of advice; the cause comes after this.
    text = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return exc.__class__.__name__
    first = lines[0] if len(lines[0]) <= 160 else lines[0][:157] + "..."
    return f"{exc.__class__.__name__}: {first}"


def _cut_zip(path: Path) -> bool:
    """A file that starts like torch's zip format but has no zip directory: cut short."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" and not zipfile.is_zipfile(path)


def _unreadable(path: Path, exc: BaseException) -> str:
    """One sentence saying why a checkpoint file cannot be read."""
    where = f"model.checkpoint {str(path)!r}"
    text = str(exc)
    unsafe = re.search(r"GLOBAL ([\w.]+)", text)
    if unsafe:
        return (
            f"{where} holds pickled Python objects ({unsafe.group(1)}), not only tensors, and "
            "is not loaded that way for safety; save the weights with "
            "torch.save(model.state_dict(), path) and point model.checkpoint at that file"
        )
    if (
        isinstance(exc, EOFError)
        or _cut_zip(path)
        or "central directory" in text
        or "truncated" in text.lower()
    ):
        return f"{where} is truncated or corrupt ({_first_line(exc)}); copy the file again"
    return (
        f"{where} is not a weights file torch can read ({_first_line(exc)}); it must hold an "
        "open_clip state dict (.pt, .pth, .bin, .safetensors) or an OpenAI CLIP model"
    )


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], bool]:
    """The state dict of a local weights file and whether it is an OpenAI TorchScript archive."""
    where = f"model.checkpoint {str(path)!r}"
    if path.is_dir():
        files = sorted(
            p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".safetensors")
        )
        hint = f" (it holds {', '.join(files[:4])})" if files else ""
        raise ModelLoadError(
            f"{where} is a directory, not a weights file; give the path of the weights file "
            f"inside it{hint}"
        )
    if not path.exists():
        raise ModelLoadError(
            f"{where} does not exist; give the path of an open_clip state dict or an OpenAI CLIP "
            ".pt file, or set model.checkpoint to '' to use model.pretrained"
        )
    if not path.is_file():
        raise ModelLoadError(f"{where} is not a regular file; give the path of a weights file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{where} is an empty file; copy the weights file again")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu")), False
        if _is_jit_archive(path):
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict()), True
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one sentence
        raise ModelLoadError(_unreadable(path, exc)) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # training checkpoints wrap the weights
    if isinstance(state, dict):
        # Stray non-tensor entries (counters, notes) are no weights; the fit check names gaps.
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not isinstance(state, dict) or not state:
        raise ModelLoadError(f"{where} holds no state dict (a mapping of names to tensors)")
    return state, False


# --- what a state dict is, and whether it fits an architecture --------------------------------


@dataclass(frozen=True)
class VisionShape:
    """The shape of a CLIP ViT image tower: what must agree between weights and architecture."""

    width: int
    patch: int
    image: int
    layers: int
    embed: int

    def __str__(self) -> str:
        """'width 768, patch 16, 224 px, 12 layers, 512-d embedding'."""
        return (
            f"width {self.width}, patch {self.patch}, {self.image} px, {self.layers} layers, "
            f"{self.embed}-d embedding"
        )


def state_vision_shape(state: dict[str, Any]) -> VisionShape | None:
    """The image tower's shape from an open_clip / OpenAI CLIP state dict (None: not a ViT)."""
    conv = state.get("visual.conv1.weight")
    pos = state.get("visual.positional_embedding")
    proj = state.get("visual.proj")
    if conv is None or pos is None or proj is None or conv.ndim != 4 or pos.ndim != 2:
        return None
    grid = math.isqrt(max(int(pos.shape[0]) - 1, 0))
    blocks = {k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")}
    return VisionShape(
        width=int(conv.shape[0]),
        patch=int(conv.shape[-1]),
        image=grid * int(conv.shape[-1]),
        layers=len(blocks),
        embed=int(proj.shape[-1]),
    )


def config_vision_shape(cfg: dict[str, Any] | None) -> VisionShape | None:
    """The image tower's shape an open_clip model config builds (None: not a plain ViT)."""
    if not cfg:
        return None
    vision = cfg.get("vision_cfg", {})
    layers, image = vision.get("layers", 12), vision.get("image_size", 224)
    if vision.get("timm_model_name") or not isinstance(layers, int):
        return None
    if isinstance(image, list | tuple):
        if len(set(image)) != 1:
            return None
        image = image[0]
    return VisionShape(
        width=int(vision.get("width", 768)),
        patch=int(vision.get("patch_size", 16)),
        image=int(image),
        layers=layers,
        embed=int(cfg.get("embed_dim", 512)),
    )


def _config_quick_gelu(open_clip, name: str) -> bool:
    """Whether open_clip builds architecture name with QuickGELU."""
    return bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))


def _twin(open_clip, name: str) -> str | None:
    """The same architecture with the other activation (ViT-B-16 <-> ViT-B-16-quickgelu)."""
    if name.endswith(QUICKGELU_SUFFIX):
        other = name.removesuffix(QUICKGELU_SUFFIX)
    else:
        other = name + QUICKGELU_SUFFIX
    return other if other in open_clip.list_models() else None


def _activation(quick: bool) -> str:
    """'QuickGELU' or 'GELU'."""
    return "QuickGELU" if quick else "GELU"


def tag_quick_gelu(open_clip, name: str, tag: str) -> bool | None:
    """The activation open_clip's registry gives for tag (of name or its twin); None: no tag."""
    from open_clip.pretrained import get_pretrained_cfg

    for arch in (name, _twin(open_clip, name)):
        cfg = get_pretrained_cfg(arch, tag) if arch else {}
        if cfg:
            return bool(cfg.get("quick_gelu", False))
    return None


def file_provenance(open_clip, path: Path) -> tuple[bool, str] | None:
    """(QuickGELU?, how it was recognised) for a file whose origin says it, else None.

    An open_clip_config.json beside the file (open_clip's folder / Hugging Face layout) gives
    the activation directly; a Hugging Face cache path (models--org--repo) or a file name that
    is one of the open_clip registry's downloads gives that tag's.
    """
    config = path.parent / "open_clip_config.json"
    if config.is_file():
        try:
            model_cfg = json.loads(config.read_text()).get("model_cfg")
        except (OSError, ValueError, AttributeError):
            model_cfg = None
        if isinstance(model_cfg, dict):
            return bool(
                model_cfg.get("quick_gelu", False)
            ), f"described by the {config.name} beside it"
    from open_clip.pretrained import get_pretrained_cfg

    # The hub cache keeps a repository org/name under models--org--name/snapshots/<rev>/.
    cached = [
        p.removeprefix("models--").split("--") for p in path.parts if p.startswith("models--")
    ]
    hub_ids = {"/".join(parts[:2]) for parts in cached}
    for arch, tag in open_clip.list_pretrained():
        cfg = get_pretrained_cfg(arch, tag)
        hub = "/".join(cfg.get("hf_hub", "").strip("/").split("/")[:2])
        url_name = cfg.get("url", "").rsplit("/", 1)[-1]
        if (hub and hub in hub_ids) or (url_name and url_name == path.name):
            return bool(cfg.get("quick_gelu", False)), f"the open_clip download {arch} / {tag}"
    return None


def _fitting_architectures(open_clip, shape: VisionShape, quick: bool | None) -> list[str]:
    """open_clip architectures whose image tower has this shape (and activation, if given)."""
    names = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if config_vision_shape(cfg) != shape:
            continue
        if quick is None or bool(cfg.get("quick_gelu", False)) == quick:
            names.append(name)
    return names


def _check_shape(open_clip, name: str, path: Path, shape: VisionShape | None) -> None:
    """ModelLoadError (one sentence) when the file's image tower is not model.name's."""
    expected = config_vision_shape(open_clip.get_model_config(name))
    if shape is None or expected is None or shape == expected:
        return
    fits = _fitting_architectures(open_clip, shape, None)
    fix = (
        f"set model.name to an architecture of that shape ({', '.join(fits[:4])})"
        if fits
        else "set model.name to the architecture the file was trained with"
    )
    raise ModelLoadError(
        f"model.checkpoint {str(path)!r} does not fit model.name {name!r}: the file holds a ViT "
        f"of {shape}, {name} is {expected}; {fix}"
    )


def _checkpoint_quick_gelu(open_clip, name: str, pretrained: str, path: Path) -> tuple[bool, str]:
    """The activation of an open_clip state dict's weights and why (ModelLoadError if unknown)."""
    named = _config_quick_gelu(open_clip, name)
    found = file_provenance(open_clip, path)
    if found is not None:
        return found[0], f"model.checkpoint {path.name} ({found[1]})"
    declared = None
    if pretrained.lower() not in ("", "none"):
        declared = tag_quick_gelu(open_clip, name, pretrained)
    twin = _twin(open_clip, name)
    where = f"model.checkpoint {str(path)!r} is an open_clip state dict, which does not say"
    if declared is not None:
        if declared == named:
            return named, f"model.pretrained {pretrained!r} names the weights"
        other = twin or f"a {_activation(declared)} variant of {name}"
        raise ModelLoadError(
            f"{where} its activation, and model.name {name!r} ({_activation(named)}) disagrees "
            f"with model.pretrained {pretrained!r} ({_activation(declared)}): set model.name to "
            f"{other!r} if the file holds {pretrained} weights, or model.pretrained to the tag "
            "the file came from"
        )
    if named or twin is None:
        # A "-quickgelu" name, or an architecture open_clip has with one activation only.
        return named, f"model.name {name!r} says so"
    from open_clip.pretrained import get_pretrained_cfg

    gelu_tags = [
        t
        for t in open_clip.list_pretrained_tags_by_model(name)
        if not get_pretrained_cfg(name, t).get("quick_gelu", False)
    ]
    example = f" (e.g. {gelu_tags[0]})" if gelu_tags else ""
    raise ModelLoadError(
        f"{where} whether its weights were trained with QuickGELU (OpenAI, MetaCLIP, DFN) or "
        f"GELU (LAION, DataComp): set model.name to {twin!r} for QuickGELU weights, or "
        f"model.pretrained to the GELU tag they came from{example} to keep {name!r}"
    )


def _architecture(
    open_clip, name: str, quick: bool, why: str, tag: str | None = None
) -> tuple[str, bool]:
    """(architecture, force_quick_gelu) building name's shape with the given activation.

    Logs an info line when this is not what model.name builds; ModelLoadError when open_clip
    has no GELU variant of a QuickGELU-only name.
    """
    named = _config_quick_gelu(open_clip, name)
    if named == quick:
        return name, False
    if quick:
        log.info(
            "%s, trained with QuickGELU: building model.name %s with QuickGELU (as %s)",
            why,
            name,
            _twin(open_clip, name) or f"{name}{QUICKGELU_SUFFIX}",
        )
        return name, True
    twin = _twin(open_clip, name)
    if twin is not None and (tag is None or tag in open_clip.list_pretrained_tags_by_model(twin)):
        log.info("%s, trained with GELU: using %s instead of model.name %s", why, twin, name)
        return twin, False
    raise ModelLoadError(
        f"{why}, trained with GELU, but model.name {name!r} is a QuickGELU architecture without "
        "a GELU variant in open_clip; set model.name to a GELU architecture of the same shape"
    )
