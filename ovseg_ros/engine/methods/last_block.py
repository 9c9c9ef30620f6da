"""Methods that change only the last ViT block: CLIP, MaskCLIP, SCLIP, ClearCLIP, NACLIP.

Each is one attention rule plus a block policy (METHODS.md section 2):

=========  ==============================  =================  ===========
method     attention in the last block     residual + FFN     logit_scale
=========  ==============================  =================  ===========
clip       SM(s QK^T) (unchanged CLIP)     kept               100
maskclip   identity: O = out_proj(V)       kept               100
sclip      SM(s QQ^T) + SM(s KK^T)         kept               40
clearclip  SM(s QQ^T)                      dropped            50
naclip     SM(s KK^T + Omega), Gaussian    dropped            40
=========  ==============================  =================  ===========

The CLS token takes part in every attention; Omega is zero on its row and column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..backbone import Backbone
from ..text import Vocabulary
from .base import Method, MethodParams, register


@dataclass
class LastBlockParams(MethodParams):
    """Block policy shared by the last-block methods."""

    keep_residual: bool = False  # x' = x + O(A) instead of O(A)
    keep_ffn: bool = False  # x' = x' + MLP(ln_2(x'))


def softmax_scores(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """SM(scale * a b^T) over the last axis, in float32."""
    return torch.softmax(torch.matmul(a.float() * scale, b.float().transpose(-1, -2)), dim=-1)


def gaussian_window(h: int, w: int, sigma: float, device: torch.device) -> torch.Tensor:
    """NACLIP's Omega: (1+hw, 1+hw), exp(-|p_i - p_j|^2 / (2 sigma^2)) on patches, 0 for CLS."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    omega = torch.exp(-torch.cdist(pos, pos).pow(2) / (2.0 * sigma * sigma))
    return F.pad(omega, (1, 0, 1, 0))


class LastBlockMethod(Method):
    """Blocks 1..L-1 unchanged; the last block with a method-specific attention and policy."""

    Params: ClassVar[type[MethodParams]] = LastBlockParams

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor | None:
        """(B, heads, N, N) attention of the last block, or None for identity attention."""
        raise NotImplementedError

    def last_block(
        self, backbone: Backbone, x: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the modified last block; return its output tokens and the block's keys."""
        p: LastBlockParams = self.params  # type: ignore[assignment]
        block = backbone.blocks[-1]
        q, k, v = backbone.qkv(block, x)
        attn = self.attention(q, k, v, grid)
        if attn is None:
            b, _, n, _ = v.shape
            out = block.attn.out_proj(v.transpose(1, 2).reshape(b, n, -1))
        else:
            out = backbone.attention_output(block, attn, v)
        y = x + block.ls_1(out) if p.keep_residual else out
        if p.keep_ffn:
            y = y + block.ls_2(block.mlp(block.ln_2(y)))
        return y, k

    def refine_logits(self, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Hook for patch-level refinements of (B, Q, h, w) logits; identity by default."""
        return logits

    @torch.inference_mode()
    def logits(self, backbone: Backbone, images: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """Per-query logits on the patch grid."""
        x, grid, _ = backbone.forward_to_last(images)
        y, keys = self.last_block(backbone, x, grid)
        feats = backbone.project(y[:, 1:])
        logits = self.patch_logits(feats, grid, vocab, self.params.logit_scale)
        return self.refine_logits(logits, keys)


@register
class CLIPBaseline(LastBlockMethod):
    """Plain CLIP: the unchanged last block applied to every patch (the weak baseline)."""

    name = "clip"
    summary = "unchanged CLIP patch tokens (baseline)"

    @dataclass
    class Params(LastBlockParams):
        """CLIP keeps its whole last block."""

        logit_scale: float = 100.0
        keep_residual: bool = True
        keep_ffn: bool = True

    def attention(self, q, k, v, grid):  # noqa: D102 - documented in the base class
        return softmax_scores(q, k, q.shape[-1] ** -0.5)


@register
class MaskCLIP(LastBlockMethod):
    """MaskCLIP (Zhou et al. 2022): value embeddings of the last block, no query-key mixing."""

    name = "maskclip"
    summary = "identity attention out_proj(V) in the last block"

    @dataclass
    class Params(LastBlockParams):
        """ks_thresh / pd_thresh are off (0) by default; the paper's values are 1.0 / 0.5."""

        logit_scale: float = 100.0
        keep_residual: bool = True
        keep_ffn: bool = True
        ks_thresh: float = 0.0  # key smoothing where max prob < this (paper 1.0); 0 = off
        pd_thresh: float = 0.0  # prompt denoising: drop queries whose max prob < this; 0 = off

    def attention(self, q, k, v, grid):  # noqa: D102
        return None

    def refine_logits(self, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Key smoothing and prompt denoising, in probability space (returned as log-probs)."""
        p: MaskCLIP.Params = self.params  # type: ignore[assignment]
        if p.ks_thresh <= 0 and p.pd_thresh <= 0:
            return logits
        b, nq, h, w = logits.shape
        prob = torch.softmax(logits.flatten(2), dim=1)  # (B, Q, hw)
        if p.ks_thresh > 0:
            k = keys[:, :, 1:].transpose(1, 2).reshape(b, h * w, -1)
            k = F.normalize(k.float(), dim=-1)
            weight = k @ k.transpose(1, 2)  # (B, hw, hw) cosine between patch keys
            smoothed = prob @ weight.transpose(1, 2)  # (B, Q, hw): sum_j cos(k_i,k_j) p_j
            weak = prob.max(dim=1, keepdim=True).values < p.ks_thresh
            prob = torch.where(weak, smoothed, prob)
        if p.pd_thresh > 0:
            keep = prob.max(dim=2, keepdim=True).values >= p.pd_thresh
            prob = torch.where(keep, prob, torch.zeros_like(prob))
        return torch.log(prob.clamp_min(1e-6)).view(b, nq, h, w)


@register
class SCLIP(LastBlockMethod):
    """SCLIP (Wang et al. 2024): correlative self-attention SM(QQ^T) + SM(KK^T)."""

    name = "sclip"
    summary = "SM(s QQ^T) + SM(s KK^T) in the last block, residual and FFN kept"

    @dataclass
    class Params(LastBlockParams):
        """Published: logit_scale 40 (VOC21: 65), slide 224/112 at short side 336."""

        logit_scale: float = 40.0
        keep_residual: bool = True
        keep_ffn: bool = True

    def attention(self, q, k, v, grid):  # noqa: D102
        s = q.shape[-1] ** -0.5
        return softmax_scores(q, q, s) + softmax_scores(k, k, s)


@register
class ClearCLIP(LastBlockMethod):
    """ClearCLIP (Lan et al. 2024): SM(QQ^T), no residual, no FFN."""

    name = "clearclip"
    summary = "SM(s QQ^T) in the last block, residual and FFN dropped"

    @dataclass
    class Params(LastBlockParams):
        """Published: logit_scale 50, short side 448, slide 448/224."""

        logit_scale: float = 50.0

    def attention(self, q, k, v, grid):  # noqa: D102
        return softmax_scores(q, q, q.shape[-1] ** -0.5)


@register
class NACLIP(LastBlockMethod):
    """NACLIP (Hajimiri et al. 2025): SM(s KK^T + Omega) with a Gaussian neighbourhood window."""

    name = "naclip"
    summary = "SM(s KK^T + Gaussian window) in the last block, residual and FFN dropped"

    @dataclass
    class Params(LastBlockParams):
        """Published: logit_scale 40, sigma 5 patches, slide 224/112, PAMR in the main table."""

        logit_scale: float = 40.0
        sigma: float = 5.0  # std of the Gaussian window, in patches

        def check(self) -> None:
            """sigma must be positive."""
            if not self.sigma > 0 or math.isinf(self.sigma):
                raise ValueError(f"naclip sigma must be a positive number, got {self.sigma}")

    def __init__(self, params: MethodParams) -> None:
        """Keep params and a cache of Omega per grid."""
        super().__init__(params)
        self._omega: dict[tuple[int, int, str], torch.Tensor] = {}

    def omega(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Omega for a grid, cached."""
        key = (grid[0], grid[1], str(device))
        table = self._omega.get(key)
        if table is None:
            table = gaussian_window(grid[0], grid[1], self.params.sigma, device)  # type: ignore
            self._omega[key] = table
        return table

    def attention(self, q, k, v, grid):  # noqa: D102
        s = q.shape[-1] ** -0.5
        scores = torch.matmul(k.float() * s, k.float().transpose(-1, -2))
        return torch.softmax(scores + self.omega(grid, k.device), dim=-1)
