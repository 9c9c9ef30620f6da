"""open_clip loading: the device and dtype, and a CLIP model built from its weights.

load_clip builds the model from a pretrained tag (downloaded, or from the local cache when the
weights hub cannot be reached), a local open_clip state dict or an OpenAI CLIP file. Which
architecture and activation the weights need, and the one-sentence refusals of weights that do
not fit, are clip_weights's (its docstring lists the rules).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .clip_weights import (
    ModelLoadError,
    _activation,
    _architecture,
    _check_shape,
    _checkpoint_quick_gelu,
    _first_line,
    _read_checkpoint,
    state_vision_shape,
    tag_quick_gelu,
)

log = logging.getLogger("ovseg_ros.engine")

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False
_register_lock = threading.Lock()


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
