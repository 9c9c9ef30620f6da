"""open_clip loading (tags, local checkpoints, OpenAI .pt) and the dense ViT block runner.

Positional embeddings. Off the native grid the (gh x gw) patch table is resampled the way the
official codes of SCLIP, ClearCLIP, NACLIP, ProxyCLIP and CLIPtrase (and DINO's) do it:
``F.interpolate(table, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode='bicubic')`` with the
default ``recompute_scale_factor`` (the kernel samples with that scale factor, source coordinate
``(i + 0.5) * gh / (h + 0.1) - 0.5``, not with ``gh / h``); the output size is
``floor(gh * (h + 0.1) / gh) = h``, the +0.1 only guarding that floor. At the native grid the
model's table is used as it is. This differs from ``F.interpolate(size=(h, w))`` by up to 0.065
cells at the far edge. CLIPer's official code resizes its table bilinearly by size and rounds it
through fp16; ``positional_embedding(h, w, style="bilinear_fp16")`` gives that table (CLIPer's
default). Tables are cached per grid and style. One deliberate difference: the CLIP codes keep
the unresized table for any grid with the native number of patches (e.g. 7 x 28 for 14 x 14); the
engine resamples every grid but the native one.

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

import contextlib
import json
import logging
import math
import os
import re
import socket
import threading
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("ovseg_ros.engine")

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False
_register_lock = threading.Lock()

#: Added to the target grid by the official codes before dividing by the native grid: the
#: scale factor whose floor(native * scale) is the target size (see the module docstring).
POS_OFFSET = 0.1
#: Positional-table styles: the official bicubic sampling, CLIPer's bilinear table in fp16, and
#: the antialiased bicubic resize by size (DINOv2 with registers, timm).
POS_STYLES = ("bicubic", "bilinear_fp16", "bicubic_antialias")
#: open_clip's names for the QuickGELU variant of a GELU architecture end with this.
QUICKGELU_SUFFIX = "-quickgelu"


def resample_positions(grid: torch.Tensor, size: tuple[int, int], style: str) -> torch.Tensor:
    """(1, D, gh, gw) float positional grid -> (1, D, h, w) with the official sampling of style.

    'bicubic': scale factor ((h + 0.1) / gh, (w + 0.1) / gw), used by the kernel as given;
    'bilinear_fp16': bilinear by size (the fp16 rounding is the caller's); 'bicubic_antialias':
    antialiased bicubic by size.
    """
    h, w = size
    gh, gw = grid.shape[-2:]
    if style == "bicubic":
        # recompute_scale_factor=False (the default): the kernel maps output pixel i to source
        # (i + 0.5) / scale - 0.5 with this very scale, which is what the official codes sample.
        out = F.interpolate(
            grid,
            scale_factor=((h + POS_OFFSET) / gh, (w + POS_OFFSET) / gw),
            mode="bicubic",
            align_corners=False,
            recompute_scale_factor=False,
        )
    elif style == "bilinear_fp16":
        out = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    elif style == "bicubic_antialias":
        out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    else:
        raise ValueError(f"positional-table style must be one of {POS_STYLES}, got {style!r}")
    if tuple(out.shape[-2:]) != (h, w):  # the official codes assert the same
        raise RuntimeError(f"positional table resampled to {tuple(out.shape[-2:])}, not {size}")
    return out


class ModelLoadError(RuntimeError):
    """The model or its weights could not be loaded; the message says why and what to do."""


def _open_clip():
    """Import open_clip once and register the package's own model configurations."""
    global _registered
    import open_clip

    with _register_lock:
        if not _registered:
            open_clip.add_model_config(_CONFIG_DIR)
            _registered = True
    return open_clip


def resolve_device(device: str) -> torch.device:
    """Turn 'auto' / 'cpu' / 'cuda' / 'cuda:N' into a torch.device, checking it exists."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} does not exist: {torch.cuda.device_count()} GPU(s) visible"
            )
    elif dev.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return dev


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Pick the compute dtype: auto = fp16 on CUDA, fp32 on CPU; reject unsupported pairs."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device; use fp32 (or bf16) on the CPU")
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bf16; use fp16 or fp32")
        return torch.bfloat16
    raise ValueError(f"precision must be one of auto, fp32, fp16, bf16, got {precision!r}")


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


def _into_model(model: nn.Module, state: dict[str, Any], name: str, path: Path) -> None:
    """Load an open_clip state dict strictly, with open_clip's small format fixes.

    Unlike open_clip.load_checkpoint it never resizes a positional table: a table of another
    input size is a different architecture and was refused before.
    """
    from open_clip.model import convert_to_custom_text_state_dict

    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        ours = getattr(model, key, None)
        if key in state and isinstance(ours, torch.Tensor) and ours.ndim != state[key].ndim:
            state[key] = state[key].reshape(ours.shape)
    if getattr(model, "logit_bias", None) is not None and "logit_bias" not in state:
        state["logit_bias"] = torch.zeros_like(model.logit_bias)
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} tensors differ in shape (e.g. {k}: file {tuple(state[k].shape)}, "
                f"{name} {tuple(expected[k].shape)})"
            )
        if missing:
            parts.append(f"{len(missing)} are missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} are not in {name} (e.g. {extra[0]})")
        raise ModelLoadError(
            f"model.checkpoint {str(path)!r} does not fit model.name {name!r}: "
            f"{', '.join(parts)}; set model.name to the architecture the file was trained with"
        )
    model.load_state_dict(state, strict=True)


def _load_openai(name: str, path: Path, state: dict[str, Any], archive: bool) -> nn.Module:
    """An OpenAI CLIP file: QuickGELU and the architecture read from the file (info line)."""
    from open_clip.model import build_model_from_openai_state_dict

    shape = state_vision_shape(state)
    if shape is None:
        raise ModelLoadError(
            f"model.checkpoint {str(path)!r} is an OpenAI CLIP file without a ViT image tower "
            "(a ResNet CLIP?); the dense methods need a ViT such as ViT-B/16"
        )
    try:
        model = build_model_from_openai_state_dict(dict(state), cast_dtype=torch.float32)
        model.float()
        # open_clip's builder rounds the weights through fp16; reload them at full precision.
        sizes = ("input_resolution", "context_length", "vocab_size")
        model.load_state_dict({k: v for k, v in state.items() if k not in sizes})
    except (RuntimeError, KeyError, ValueError, AssertionError) as exc:
        raise ModelLoadError(
            f"model.checkpoint {str(path)!r} looks like an OpenAI CLIP file but does not build "
            f"({_first_line(exc)}); use the original ViT .pt file or an open_clip state dict"
        ) from exc
    kind = "TorchScript archive" if archive else "state dict"
    log.info(
        "model.checkpoint %s: OpenAI CLIP %s, architecture read from the file (ViT of %s, "
        "QuickGELU); model.name %s is used for the tokenizer only",
        path.name,
        kind,
        shape,
        name,
    )
    return model


def _load_checkpoint_model(
    open_clip, name: str, path: Path, pretrained: str = ""
) -> tuple[nn.Module, str]:
    """Build a model from a local file: OpenAI JIT / state dict, or an open_clip state dict."""
    state, archive = _read_checkpoint(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if archive or "input_resolution" in state:
        return _load_openai(name, path, state, archive), f"OpenAI checkpoint {path.name}"
    _check_shape(open_clip, name, path, state_vision_shape(state))
    quick, why = _checkpoint_quick_gelu(open_clip, name, pretrained, path)
    arch, force = _architecture(open_clip, name, quick, why)
    model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=force)
    _into_model(model, state, arch, path)
    return model, f"open_clip checkpoint {path.name}"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the weights hub's host name resolves (a dead network fails at once here)."""
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def _offline_unless_reachable():
    """Use only the local weights cache when the hub cannot be reached (no minute of retries)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    if constants.HF_HUB_OFFLINE or _hub_reachable():
        yield
        return
    log.info("weights hub unreachable: looking in the local cache only")
    with _register_lock:
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = False


def load_clip(
    name: str, pretrained: str, checkpoint: str = "", cache_dir: str = ""
) -> tuple[nn.Module, str]:
    """Create an open_clip model (fp32, CPU, eval) and say where its weights came from."""
    open_clip = _open_clip()
    if name not in open_clip.list_models():
        raise ModelLoadError(
            f"model.name {name!r} is not an open_clip architecture; e.g. ViT-B-16, ViT-L-14 "
            "(open_clip.list_models() lists them all)"
        )
    if checkpoint:
        model, source = _load_checkpoint_model(
            open_clip, name, Path(checkpoint).expanduser(), pretrained
        )
    elif pretrained.lower() in ("", "none"):
        log.warning(
            "model.pretrained is 'none': %s runs with RANDOM weights; its segmentations are "
            "meaningless (use this for smoke tests only)",
            name,
        )
        # A fixed seed makes random weights (and so their cached text embeddings) reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(name, pretrained=None)
        source = "random weights (seed 0)"
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ModelLoadError(
                f"model.pretrained {pretrained!r} is not a known tag for {name}; known tags: "
                f"{tags or 'none'}; or set model.checkpoint to a local weights file"
            )
        # open_clip only warns when the tag's activation is not the architecture's (ViT-B-16 +
        # openai builds GELU around QuickGELU weights); build what the weights were trained with.
        quick = bool(tag_quick_gelu(open_clip, name, pretrained))
        arch, force = _architecture(
            open_clip, name, quick, f"model.pretrained {pretrained!r}", tag=pretrained
        )
        where = cache_dir or "open_clip's default cache (~/.cache/huggingface or ~/.cache/clip)"
        try:
            with _offline_unless_reachable():
                model = open_clip.create_model(
                    arch,
                    pretrained=pretrained,
                    cache_dir=cache_dir or None,
                    force_quick_gelu=force,
                )
        except Exception as exc:  # noqa: BLE001 - download failures come in many types
            raise ModelLoadError(
                f"cannot load the weights of {name} / {pretrained}: {_first_line(exc)}. The first "
                f"use downloads them into {where}; without network, copy them there beforehand, "
                "or set model.checkpoint to a local open_clip or OpenAI CLIP weights file"
            ) from exc
        source = f"pretrained {pretrained}"
        if force or arch != name:
            source += f" ({_activation(quick)})"
    model.eval().requires_grad_(False)
    return model, source


@dataclass
class BlockCapture:
    """What the block runner recorded: each block's input and per-head attention (if asked)."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    attentions: list[torch.Tensor] = field(default_factory=list)


class Backbone:
    """A CLIP ViT prepared for dense prediction: any input size, last block exposed."""

    def __init__(
        self, model: nn.Module, *, name: str, source: str, device: torch.device, dtype: torch.dtype
    ) -> None:
        """Move the model to device/dtype and check its vision tower is a standard ViT."""
        visual = getattr(model, "visual", None)
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None or not hasattr(visual, "conv1"):
            raise ModelLoadError(
                f"{name} has no open_clip VisionTransformer; dense methods need a ViT "
                "(e.g. ViT-B-16)"
            )
        if getattr(visual, "attn_pool", None) is not None or not all(
            isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks
        ):
            raise ModelLoadError(
                f"{name} uses custom attention blocks or attention pooling, which the dense "
                "methods do not support; use a standard CLIP ViT (e.g. ViT-B-16)"
            )
        self.model = model.to(device=device, dtype=dtype)
        self.visual = visual
        self.blocks = blocks
        self.name = name
        self.source = source
        self.device = device
        self.dtype = dtype
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.native_grid = tuple(int(g) for g in visual.grid_size)
        self.width = int(visual.conv1.out_channels)
        self.heads = int(blocks[-1].attn.num_heads)
        self.embed_dim = int(visual.proj.shape[1]) if visual.proj is not None else self.width
        mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self._pos_cache: dict[tuple[int, int, str], torch.Tensor] = {}
        self._pos_lock = threading.Lock()
        self.quantized = False
        self._int8_attention: list[tuple[nn.Module, nn.Module]] = []
        self.compile_mode = "none"
        self._trunk = self._run_trunk

    def quantize_int8(self) -> int:
        """Make the vision tower's linear layers dynamic int8 for the CPU; return how many.

        CPU and fp32 only (the int8 kernels are CPU kernels that take fp32 activations). Every
        block's MLP becomes int8. The blocks before the last also get int8 copies of their
        attention projections, used by the shared forward (_run_trunk); the fp32 weights stay,
        because the methods and the capturing paths read them directly.
        """
        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError(
                "model.quantize int8 runs on the CPU in fp32; set device cpu and precision fp32 "
                "(or auto), or model.quantize none"
            )
        engine = torch.backends.quantized.engine
        engines = torch.backends.quantized.supported_engines
        if engine == "none" or engine not in engines:
            preferred = [e for e in ("x86", "fbgemm", "qnnpack") if e in engines]
            if not preferred:
                raise ValueError(
                    f"this torch build has no int8 CPU kernels (engines {engines}); set "
                    "model.quantize none"
                )
            torch.backends.quantized.engine = preferred[0]
        with warnings.catch_warnings():
            # torch.ao.quantization announces its move to torchao; the eager API still works.
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
            from torch.ao.quantization import quantize_dynamic

            count = sum(type(m) is nn.Linear for m in self.visual.modules())
            quantize_dynamic(self.visual, {nn.Linear}, dtype=torch.qint8, inplace=True)
            projections = []
            for block in self.blocks[:-1]:
                attn: nn.MultiheadAttention = block.attn
                qkv = nn.Linear(self.width, 3 * self.width, bias=attn.in_proj_bias is not None)
                qkv.weight, qkv.bias = attn.in_proj_weight, attn.in_proj_bias
                out = nn.Linear(self.width, self.width, bias=attn.out_proj.bias is not None)
                out.weight, out.bias = attn.out_proj.weight, attn.out_proj.bias
                for lin in (qkv, out):
                    lin.qconfig = torch.ao.quantization.default_dynamic_qconfig
                projections.append((DynamicLinear.from_float(qkv), DynamicLinear.from_float(out)))
        self._int8_attention = projections
        self.quantized = True
        return count + 2 * len(projections)

    def compile_trunk(self, mode: str) -> None:
        """torch.compile the blocks before the last (the part every method shares)."""
        if mode == "none":
            self._trunk, self.compile_mode = self._run_trunk, "none"
            return
        kwargs = {} if mode == "default" else {"mode": mode}
        # dynamic=False: one graph per frame size (a camera keeps its size), no shape guards
        # that would slow every frame; a new size compiles once.
        self._trunk = torch.compile(self._run_trunk, dynamic=False, **kwargs)
        self.compile_mode = mode

    def _run_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks 1..L-1 with their normal forward (int8 attention projections if quantized)."""
        if self._int8_attention:
            for block, (qkv, out) in zip(self.blocks[:-1], self._int8_attention, strict=True):
                x = self._int8_block(block, qkv, out, x)
            return x
        for block in self.blocks[:-1]:
            x = block(x)
        return x

    def _int8_block(
        self, block: nn.Module, qkv: nn.Module, out: nn.Module, x: torch.Tensor
    ) -> torch.Tensor:
        """A block's normal forward with int8 projections: x + attn(ln_1 x), then x + MLP."""
        b, n, _ = x.shape
        q, k, v = qkv(block.ln_1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        x = x + block.ls_1(out(attended))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks in the vision tower."""
        return len(self.blocks)

    def positional_embedding(self, h: int, w: int, style: str = "bicubic") -> torch.Tensor:
        """The (1 + h*w, D) positional table for an h x w grid, in the model dtype, cached.

        style 'bicubic' (default): the model's table at the native grid, else the official
        +0.1 scale-factor bicubic resampling (module docstring); 'bilinear_fp16': CLIPer's
        table, resized bilinearly by size (the native grid too, where that is a copy) and rounded
        through fp16 as its code does; 'bicubic_antialias': antialiased bicubic by size.
        """
        key = (h, w, style)
        table = self._pos_cache.get(key)
        if table is not None:
            return table
        if style not in POS_STYLES:
            raise ValueError(f"positional-table style must be one of {POS_STYLES}, got {style!r}")
        pos = self.visual.positional_embedding
        if (h, w) == self.native_grid and style != "bilinear_fp16":
            table = pos.detach()
        else:
            gh, gw = self.native_grid
            cls_pos, patch_pos = pos[:1].float(), pos[1:].float()
            grid = patch_pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            grid = resample_positions(grid, (h, w), style)
            patch_pos = grid.permute(0, 2, 3, 1).reshape(h * w, -1)
            table = torch.cat([cls_pos, patch_pos])
            if style == "bilinear_fp16":
                # CLIPer's upsample_pos_emb returns emb.half(), CLS row included.
                table = table.half()
            table = table.to(self.dtype)
        with self._pos_lock:
            self._pos_cache[key] = table
        return table

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) float RGB in [0,1] -> CLIP-normalised input in the model dtype."""
        return ((images - self.mean) / self.std).to(self.dtype)

    def embed(
        self, images: torch.Tensor, pos_style: str = "bicubic"
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify normalised images (H, W multiples of the patch) into tokens [CLS]+patches.

        pos_style picks the positional table (see positional_embedding).
        """
        x = self.visual.conv1(images)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(h, w, pos_style)
        return self.visual.ln_pre(x), (h, w)

    def qkv(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Q, K, V of a block (applied to ln_1(x)) as (B, heads, N, head_dim)."""
        attn: nn.MultiheadAttention = block.attn
        h = block.ln_1(x)
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        b, n, _ = qkv.shape
        qkv = qkv.view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attention_output(
        self, block: nn.Module, attn: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """out_proj(concat_heads(A @ V)); attn is (B or 1, heads or 1, N, N)."""
        out = torch.matmul(attn.to(v.dtype), v)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, -1)
        return block.attn.out_proj(out)

    def run_block_capturing(
        self, block: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A block's normal forward computed by hand, returning its per-head softmax(QK^T)."""
        q, k, v = self.qkv(block, x)
        scale = q.shape[-1] ** -0.5
        attn = torch.softmax(torch.matmul(q * scale, k.transpose(-1, -2)).float(), dim=-1)
        x = x + block.ls_1(self.attention_output(block, attn, v))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, attn

    def forward_to_last(
        self, images: torch.Tensor, capture_inputs: bool = False, capture_attention: bool = False
    ) -> tuple[torch.Tensor, tuple[int, int], BlockCapture]:
        """Run blocks 1..L-1 on normalised images; return the last block's input and the grid."""
        x, grid = self.embed(images)
        cap = BlockCapture()
        if not (capture_inputs or capture_attention):
            return self._trunk(x), grid, cap
        for block in self.blocks[:-1]:
            if capture_inputs:
                cap.inputs.append(x)
            if capture_attention:
                x, attn = self.run_block_capturing(block, x)
                cap.attentions.append(attn)
            else:
                x = block(x)
        if capture_inputs:
            cap.inputs.append(x)
        return x, grid, cap

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post then proj: tokens (B, N, width) -> L2-normalised features (B, N, embed_dim)."""
        x = self.visual.ln_post(tokens)
        if self.visual.proj is not None:
            x = x @ self.visual.proj
        return F.normalize(x.float(), dim=-1)


def build_backbone(
    name: str,
    pretrained: str,
    checkpoint: str,
    cache_dir: str,
    device: str,
    precision: str,
    quantize: str = "none",
    compile_mode: str = "none",
) -> Backbone:
    """Load an open_clip ViT and wrap it for dense inference on the chosen device/precision.

    quantize 'int8' makes the ViT's linear layers dynamic int8 (CPU); compile_mode other than
    'none' compiles the shared blocks with torch.compile (that mode).
    """
    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    if quantize == "int8" and (dev.type != "cpu" or dtype != torch.float32):
        # Checked before loading: a wrong pair should not cost a model load to find out.
        raise ValueError(
            f"model.quantize int8 runs on the CPU in fp32, not on {dev} in "
            f"{str(dtype).removeprefix('torch.')}; set device cpu and precision fp32 (or auto), "
            "or model.quantize none"
        )
    model, source = load_clip(name, pretrained, checkpoint, cache_dir)
    backbone = Backbone(model, name=name, source=source, device=dev, dtype=dtype)
    if quantize == "int8":
        count = backbone.quantize_int8()
        backbone.source += f", int8 dynamic ({count} linear layers)"
    if compile_mode != "none":
        backbone.compile_trunk(compile_mode)
    return backbone


def default_cache_root() -> Path:
    """~/.cache/ovseg_ros (or $XDG_CACHE_HOME/ovseg_ros)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ovseg_ros"
