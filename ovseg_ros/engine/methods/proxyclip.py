"""ProxyCLIP (Lan et al., ECCV 2024): a vision foundation model's patch similarity as attention.

METHODS.md section 5. For normalised images (B, 3, H, W):

1. CLIP runs blocks 1..L-1 unchanged; of the last block only V = V(ln_1(x)) of the patches is used
   (CLS dropped), per head, resized bilinearly from CLIP's grid to the VFM's grid.
2. The VFM (DINO ViT-B/8 by default, ovseg_ros/engine/vfm.py) gives L2-normalised patch features
   F; S = F F^T (cosine similarity between the VFM's patches).
3. S' = gamma * (S - beta * mean(S)), mean(S) being one scalar per image over all entries;
   entries with S' < 0 are masked (-inf); A = softmax(S') over each row, shared by all heads.
   A patch's own entry (S_ii = 1) is never masked, so a row cannot be empty; this differs from
   the published code only when mean(S) > 1 / beta (e.g. a uniform image), where it gave NaN.
4. out = out_proj(concat_heads(A V)); no residual, no FFN; features ln_post(out) @ proj, patch
   logits logit_scale * cos at the VFM's resolution (finer than CLIP's: 8 px for DINO B/8).

Padding: the image is zero-padded (in normalised space, i.e. with the CLIP mean colour) evenly on
both sides to a multiple of lcm(pad_multiple, CLIP patch, VFM patch) (published: 56 = lcm(8, 14),
so 112 with CLIP's 16-pixel patches); the logits of the padded border are cut off again.
"""

from __future__ import annotations

import gc
import math
import re
import threading
import time
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..backbone import Backbone
from ..text import Vocabulary
from ..vfm import ProxyModel, load_vfm, vfm_spec
from .base import Method, MethodParams, register


@dataclass
class ProxyCLIPParams(MethodParams):
    """ProxyCLIP's hyper-parameters (published defaults, ViT-B/16 + DINO ViT-B/8).

    Published protocol: short side 336 (448 for ADE20K and Cityscapes), sliding window with crop
    336 and stride 112, each crop padded to a multiple of 56; logit_scale 40; probability
    threshold VOC21 0.2, PASCAL Context-60 0.15, COCO-Object 0.25. The engine's input.short_side,
    inference.mode / crop / stride and prob_threshold are global settings, not method parameters:
    reproduce the protocol with `--mode slide --crop 336 --stride 112` (node: inference.mode slide,
    inference.crop 336, inference.stride 112). Whole mode runs the VFM once per frame instead of
    once per crop (about half the cost of slide at 640x480).

    Cost: one VFM forward per crop besides CLIP's (DINO B/8 has 4x as many tokens as CLIP B/16
    on the same image): about 2-3x a last-block method; use a GPU on a robot.
    """

    logit_scale: float = 40.0  # temperature of softmax(logit_scale * cos) over the queries
    vfm: str = "dino_vitb8"  # proxy model: dino_vitb8 (DINO ViT-B/8), dinov2_vitb14_reg
    vfm_weights: str = "pretrained"  # 'pretrained' (timm hub tag), 'none' (random), or a file
    beta: float = 1.2  # S' = gamma * (S - beta * mean(S)): shift relative to the mean similarity
    gamma: float = 3.0  # ... and sharpness of the softmax over the masked similarities
    pad_multiple: int = 56  # pad the input to a multiple of lcm(this, CLIP patch, VFM patch)

    def check(self) -> None:
        """The proxy model must be known; gamma > 0; beta >= 0; pad_multiple >= 1."""
        vfm_spec(self.vfm)  # ValueError lists the known proxy models
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"proxyclip beta must be a number >= 0, got {self.beta}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"proxyclip gamma must be a positive number, got {self.gamma}")
        if self.pad_multiple < 1:
            raise ValueError(f"proxyclip pad_multiple must be >= 1, got {self.pad_multiple}")


def proxy_attention(features: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """(B, 1, n, n) attention shared by all heads from (B, n, D) L2-normalised VFM features."""
    sim = torch.matmul(features.float(), features.float().transpose(1, 2))
    scores = gamma * (sim - beta * sim.mean(dim=(1, 2), keepdim=True))
    keep = scores >= 0
    keep |= torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1).unsqueeze(1)


def resize_values(v: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Patch values (B, heads, 1 + h*w, d) with CLS first -> (B, heads, H'*W', d) on size."""
    b, heads, _, d = v.shape
    patches = v[:, :, 1:].reshape(b * heads, grid[0], grid[1], d).permute(0, 3, 1, 2)
    if tuple(size) != tuple(grid):
        patches = F.interpolate(patches, size=size, mode="bilinear", align_corners=False)
    return patches.permute(0, 2, 3, 1).reshape(b, heads, size[0] * size[1], d)


def centred_padding(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that brings both sides to a multiple, centred."""
    ph, pw = (-height) % multiple, (-width) % multiple
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


#: Loaded proxy models by (vfm, weights, device, dtype, CLIP colour normalisation), held only by
#: the methods using them: a parameter change (a new ProxyCLIP instance) reuses the model, and it
#: is freed with its last user.
_SHARED: weakref.WeakValueDictionary[tuple, ProxyModel] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def shared_proxy(vfm: str, weights: str, backbone: Backbone) -> ProxyModel:
    """The proxy model for a backbone's device and dtype, loaded unless a method holds one."""
    colour = tuple(backbone.mean.flatten().tolist() + backbone.std.flatten().tolist())
    key = (vfm, weights, str(backbone.device), backbone.dtype, colour)
    with _SHARED_LOCK:
        model = _SHARED.get(key)
        if model is None:
            model = load_vfm(
                vfm, weights, backbone.device, backbone.dtype, backbone.mean, backbone.std
            )
            _SHARED[key] = model
        return model


@register
class ProxyCLIP(Method):
    """ProxyCLIP: attention from a vision foundation model's patch similarity, CLIP's values."""

    name = "proxyclip"
    summary = "VFM (DINO B/8) patch similarity as last-block attention on CLIP's V; no res/FFN"
    Params: ClassVar[type[MethodParams]] = ProxyCLIPParams

    def __init__(self, params: MethodParams) -> None:
        """Keep params; the proxy model is loaded by prepare() (or on first use)."""
        super().__init__(params)
        self._proxy: ProxyModel | None = None
        self._proxy_key: tuple[str, torch.dtype] | None = None
        self._lock = threading.Lock()

    def prepare(self, backbone: Backbone) -> None:
        """Load the proxy model on the backbone's device and dtype (ModelLoadError if it fails)."""
        self.proxy(backbone)

    def release(self) -> None:
        """Drop this method's hold on the proxy model (freed when no other method holds it)."""
        with self._lock:
            model, self._proxy, self._proxy_key = self._proxy, None, None
        if model is not None:
            on_cuda = model.device.type == "cuda"
            del model
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()

    @property
    def loaded(self) -> bool:
        """Whether the proxy model is in memory."""
        return self._proxy is not None

    def proxy(self, backbone: Backbone) -> ProxyModel:
        """The proxy model on the backbone's device and dtype (shared with other instances)."""
        p: ProxyCLIPParams = self.params  # type: ignore[assignment]
        key = (str(backbone.device), backbone.dtype)
        with self._lock:
            if self._proxy is None or self._proxy_key != key:
                self._proxy = None
                self._proxy = shared_proxy(p.vfm, p.vfm_weights, backbone)
                self._proxy_key = key
            return self._proxy

    def token_patch(self, backbone: Backbone) -> int:
        """The proxy's patch when finer than CLIP's (DINO B/8: 4x CLIP's tokens at patch 16)."""
        p: ProxyCLIPParams = self.params  # type: ignore[assignment]
        if self._proxy is not None:
            return min(backbone.patch_size, self._proxy.patch_size)
        found = re.search(r"patch(\d+)", vfm_spec(p.vfm).timm_model)
        return min(backbone.patch_size, int(found.group(1))) if found else backbone.patch_size

    @torch.inference_mode()
    def logits(self, backbone: Backbone, images: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """Per-query logits on the VFM grid, or (B, Q, H, W) when the input had to be padded."""
        p: ProxyCLIPParams = self.params  # type: ignore[assignment]
        proxy = self.proxy(backbone)
        height, width = images.shape[-2:]
        multiple = math.lcm(p.pad_multiple, backbone.patch_size, proxy.patch_size)
        pad = centred_padding(height, width, multiple)
        padded = F.pad(images, pad) if any(pad) else images

        start = time.perf_counter()
        features = proxy.features(padded)
        if padded.device.type == "cuda":
            torch.cuda.synchronize(padded.device)
        self.record_timing("vfm", (time.perf_counter() - start) * 1e3)
        vfm_grid = proxy.grid(*padded.shape[-2:])

        x, grid, _ = backbone.forward_to_last(padded)
        block = backbone.blocks[-1]
        _, _, v = backbone.qkv(block, x)
        attn = proxy_attention(features, p.beta, p.gamma)
        out = backbone.attention_output(block, attn, resize_values(v, grid, vfm_grid))
        logits = self.patch_logits(backbone.project(out), vfm_grid, vocab, p.logit_scale)
        if not any(pad):
            return logits
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        left, _, top, _ = pad
        return logits[..., top : top + height, left : left + width]
