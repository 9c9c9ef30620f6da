"""Vision foundation models (VFM) used as attention proxies (ProxyCLIP), loaded through timm.

A VFM here is a timm VisionTransformer whose last-layer patch tokens (after its final norm, class
and register tokens dropped) give one L2-normalised feature per patch. Known models:

==================  ======================================  =====================================
name                timm architecture.tag                   notes
==================  ======================================  =====================================
dino_vitb8          vit_base_patch8_224.dino                DINO ViT-B/8 (ProxyCLIP's default)
dinov2_vitb14_reg   vit_base_patch14_reg4_dinov2.lvd142m    DINOv2 ViT-B/14 with 4 registers
==================  ======================================  =====================================

Weights (`weights` argument, the `vfm_weights` method parameter):

- ``pretrained``: the timm tag's weights from the Hugging Face hub, cached in the hub cache
  (``$HF_HUB_CACHE``, by default ~/.cache/huggingface/hub). Without network they must be in that
  cache already; the hub is then not contacted at all.
- ``none``: random weights (seed 0), with a loud warning: smoke tests only.
- a file path: a local checkpoint (.safetensors, .pth, .bin) in timm's layout or the original
  DINO / DINOv2 layout (timm converts it), e.g. ``dino_vitbase8_pretrain.pth``.

The model runs on the CLIP backbone's device and dtype. Its input is the CLIP-normalised image
converted back to RGB and normalised with the VFM's own mean/std (ImageNet's for DINO/DINOv2), as
in the published code; H and W must be multiples of the VFM's patch size.

Positional embeddings off the native grid follow the code the published method loads
(``torch.hub`` in ProxyCLIP), not timm's ``dynamic_img_size`` resize (antialiased bicubic by
size): DINO's ``interpolate_pos_encoding`` (facebookresearch/dino, vision_transformer.py) resizes
with ``scale_factor=((h + 0.1) / 28, (w + 0.1) / 28)``, bicubic, no antialiasing, exactly as the
CLIP codes do (backbone.resample_positions, style 'bicubic'); DINOv2 with registers
(``dinov2_vitb14_reg``: interpolate_offset 0, interpolate_antialias True) resizes by size with
antialiased bicubic, which is timm's resize (style 'bicubic_antialias'). The table is the model's
own at the native grid, computed in float32 and cast to the model dtype otherwise, and cached per
grid. VFMSpec.pos_interpolation says which; the tokens are then built as timm builds them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import POS_STYLES, resample_positions
from .clip_loading import _offline_unless_reachable
from .clip_weights import ModelLoadError

log = logging.getLogger("ovseg_ros.engine")


@dataclass(frozen=True)
class VFMSpec:
    """A proxy model: its name, the timm architecture.tag that builds it, and extra kwargs."""

    name: str
    timm_model: str  # timm "architecture.tag"; the tag picks the pretrained weights
    summary: str = ""
    # Extra timm.create_model keyword arguments (tests shrink embed_dim/depth/heads here).
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # How the official code resizes the positional table off the native grid (backbone
    # POS_STYLES): 'bicubic' = DINO's +0.1 scale factor, 'bicubic_antialias' = DINOv2-reg's.
    pos_interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        """Reject an unknown positional-table style at registration."""
        if self.pos_interpolation not in POS_STYLES:
            raise ValueError(
                f"VFMSpec {self.name!r}: pos_interpolation must be one of {POS_STYLES}, got "
                f"{self.pos_interpolation!r}"
            )


VFM_SPECS: dict[str, VFMSpec] = {}
_specs_lock = threading.Lock()


def register_vfm(spec: VFMSpec) -> VFMSpec:
    """Add (or replace) a proxy model under spec.name."""
    with _specs_lock:
        VFM_SPECS[spec.name] = spec
    return spec


register_vfm(VFMSpec("dino_vitb8", "vit_base_patch8_224.dino", "DINO ViT-B/8 (Caron et al. 2021)"))
register_vfm(
    VFMSpec(
        "dinov2_vitb14_reg",
        "vit_base_patch14_reg4_dinov2.lvd142m",
        "DINOv2 ViT-B/14 with registers (Darcet et al. 2024)",
        pos_interpolation="bicubic_antialias",
    )
)


def vfm_spec(name: str) -> VFMSpec:
    """The spec registered under name; ValueError lists the known names."""
    try:
        return VFM_SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown proxy model (vfm) {name!r}; known: {sorted(VFM_SPECS)}"
        ) from None


def hub_cache_dir() -> str:
    """Where the Hugging Face hub (and so timm) keeps downloaded weights."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return "~/.cache/huggingface/hub"


class ProxyModel:
    """A loaded VFM: (B, 3, H, W) CLIP-normalised images -> L2-normalised patch features."""

    def __init__(
        self, model: nn.Module, spec: VFMSpec, source: str, clip_mean: Any, clip_std: Any
    ) -> None:
        """Wrap an eval-mode timm ViT already on its device and dtype."""
        self.model = model
        self.spec = spec
        self.source = source
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, tuple | list) else patch)
        self.prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = cfg.get("mean") or (0.485, 0.456, 0.406)
        std = cfg.get("std") or (0.229, 0.224, 0.225)
        kw = {"device": self.device, "dtype": torch.float32}
        self.mean = torch.tensor(mean, **kw).view(1, 3, 1, 1)
        self.std = torch.tensor(std, **kw).view(1, 3, 1, 1)
        self.clip_mean = torch.as_tensor(clip_mean, **kw).view(1, 3, 1, 1)
        self.clip_std = torch.as_tensor(clip_std, **kw).view(1, 3, 1, 1)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._pos_lock = threading.Lock()

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid of an image whose sides are multiples of the patch size."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"VFM input {height}x{width} is not a multiple of its patch {p}")
        return height // p, width // p

    def to_input(self, clip_images: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images -> RGB -> the VFM's normalisation, in its dtype."""
        rgb = clip_images.float() * self.clip_std + self.clip_mean
        return ((rgb - self.mean) / self.std).to(self.dtype)

    def positional_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, P + h*w, D) positional table of an h x w grid (P: prefix rows), cached per grid.

        The model's own table at its native grid; otherwise the patch rows resampled in float32
        as spec.pos_interpolation says (module docstring) and cast to the model dtype.
        """
        table = self._pos_cache.get((h, w))
        if table is not None:
            return table
        model = self.model
        pos = model.pos_embed.detach()
        gh, gw = (int(g) for g in model.patch_embed.grid_size)
        prefix = 0 if model.no_embed_class else int(model.num_prefix_tokens)
        if (h, w) == (gh, gw):
            table = pos
        else:
            grid = pos[:, prefix:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            grid = resample_positions(grid, (h, w), self.spec.pos_interpolation)
            patches = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
            table = torch.cat([pos[:, :prefix].float(), patches], dim=1).to(pos.dtype)
        with self._pos_lock:
            self._pos_cache[(h, w)] = table
        return table

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward_features with the official positional table: (B, P + h*w, D)."""
        model = self.model
        x = model.patch_embed(x)
        if x.ndim == 4:  # dynamic_img_size: (B, h, w, D)
            b, h, w, d = x.shape
            x = x.reshape(b, h * w, d)
        else:  # a fixed-size model: its native grid
            h, w = (int(g) for g in model.patch_embed.grid_size)
        pos = self.positional_embedding(h, w)
        prefix = [getattr(model, "cls_token", None), getattr(model, "reg_token", None)]
        prefix = [t.expand(x.shape[0], -1, -1) for t in prefix if t is not None]
        # As timm's _pos_embed: tables without class rows are added before the prefix tokens
        # are put in front (DINOv2 layout), tables with them after.
        if model.no_embed_class:
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        x = model.norm_pre(model.patch_drop(model.pos_drop(x)))
        return model.norm(model.blocks(x))

    @torch.inference_mode()
    def features(self, clip_images: torch.Tensor) -> torch.Tensor:
        """(B, h*w, D) float32 L2-normalised last-layer patch tokens (row-major on the grid)."""
        self.grid(*clip_images.shape[-2:])
        tokens = self.tokens(self.to_input(clip_images))
        return F.normalize(tokens[:, self.prefix_tokens :].float(), dim=-1)


def _create(spec: VFMSpec, **kwargs: Any) -> nn.Module:
    """timm.create_model for a spec: no classifier head, any input size."""
    import timm

    args = {"num_classes": 0, "dynamic_img_size": True, **dict(spec.model_kwargs), **kwargs}
    return timm.create_model(spec.timm_model, **args)


def load_vfm(
    name: str,
    weights: str,
    device: torch.device,
    dtype: torch.dtype,
    clip_mean: Any = (0.48145466, 0.4578275, 0.40821073),
    clip_std: Any = (0.26862954, 0.26130258, 0.27577711),
) -> ProxyModel:
    """Build a registered VFM with pretrained / random / local-file weights on device and dtype."""
    try:
        import timm  # noqa: F401 - only to report a missing package clearly
    except ImportError as exc:
        raise ModelLoadError(
            "the proxy model needs the timm package (pip install timm); it is not installed"
        ) from exc
    spec = vfm_spec(name)
    choice = weights.strip()
    if choice.lower() == "none":
        log.warning(
            "vfm_weights is 'none': the proxy model %s runs with RANDOM weights; its attention "
            "and so the segmentations are meaningless (use this for smoke tests only)",
            spec.timm_model,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _create(spec, pretrained=False)
        source = "random weights (seed 0)"
    elif choice.lower() in ("", "pretrained"):
        try:
            with _offline_unless_reachable():
                model = _create(spec, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - download failures come in many types
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ModelLoadError(
                f"cannot load the pretrained weights of the proxy model {name} (timm tag "
                f"{spec.timm_model!r}: {exc.__class__.__name__}: {first}); the first use "
                f"downloads them into the Hugging Face cache {hub_cache_dir()}, so without "
                "network copy them there beforehand, or set the method parameter vfm_weights to "
                "a local checkpoint file (timm or original DINO/DINOv2 .pth/.safetensors)"
            ) from exc
        source = f"pretrained {spec.timm_model}"
    else:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise ModelLoadError(
                f"vfm_weights {choice!r} is neither 'pretrained', 'none' nor an existing file; "
                f"give a local checkpoint of {spec.timm_model} (timm or original layout)"
            )
        try:
            model = _create(spec, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        except Exception as exc:  # noqa: BLE001 - unreadable or mismatching files alike
            raise ModelLoadError(
                f"vfm_weights {str(path)!r} does not load into {spec.timm_model} "
                f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                f"it must be a checkpoint of that architecture (proxy model {name})"
            ) from exc
        source = f"checkpoint {path.name}"
    model.eval().requires_grad_(False)
    model.to(device=device, dtype=dtype)
    log.info(
        "proxy model %s (%s) loaded: %s on %s/%s", name, spec.timm_model, source, device, dtype
    )
    return ProxyModel(model, spec, source, clip_mean, clip_std)
