"""CLIPer (Sun et al.): early-layer fusion (ELF) and optional fine-grained compensation (FGC).

METHODS.md section 4. With A^n the per-head softmax(s QK^T) of block n < L and F^n the input of
block n (n = 1..L, F^L being the input of the last block):

1. M = sum_n A^n per head; divide by column sums, then by row sums; M <- (M + M^T) / 2;
   subtract the column means; clamp at 0; divide by row sums -> fused attention Ã (B, H, N, N).
2. For every n: out_n = out_proj(Ã · V_L(ln_1^L(F^n))) with the LAST block's V and out_proj (no
   residual, no FFN); f_n = normalize(ln_post(out_n) @ proj) on the patches.
3. P_n = softmax over [foreground queries; background words; mean foreground embedding] of
   logit_scale * cos(f_n, t); the foreground channels are kept.
4. S_sel = P_select; entries below attention_thr x the query's spatial max are zeroed; S_sel is
   propagated with the head-mean of Ã on the patches: S'_j = sum_i S_sel,i Ã_ij.
5. Coarse map S_c = S' + mean_n P_n (all L layers).
6. FGC (optional, Stable Diffusion 2.1-base): S_f = A_f S_c on the 64 x 64 latent grid (fgc.py).

Labelling (done here, returned as logits whose softmax/argmax in the Segmenter reproduces it):
per query, score = max S_c (with FGC: 0.5 max S_c + 0.5 max S_f); map = S_f with FGC, else S_c;
V = map / (max map + 1e-5) * score, and V = 0 for queries whose score is not above
score_threshold; V is upsampled bilinearly to the input size. A pixel is background where every
V is below bkg_thre. The logits are log max(V, 1e-6) for the foreground queries and
log max(bkg_thre, 2e-6) for the first background word (log 1e-6 for the other background words),
so the argmax is the best V, or background where no V reaches bkg_thre (with bkg_thre 0: only
where every query was dropped by score_threshold). This needs at least one background word in the
vocabulary; without one every pixel takes its best class (a warning says so once).

Published settings: S = 336, whole image; ViT-B/16 select_layer -1, logit_scale 100; ViT-L/14
select_layer -2, logit_scale 50 (both chosen from the depth when left at 0); attention_thr 0.2
(0.1-0.35 by dataset, shared by ELF and FGC as in the published configs); score_threshold /
bkg_thre 0.7 / 0.6 (VOC21, ViT-B; Pascal Context 0.45 / 0.45). Differences from the published
code: F^n is the input of block n as METHODS.md specifies (that code feeds ln_1 of block n's input
for n < L); its optional 224-pixel sliding window inside the method is not implemented (the
engine's slide mode runs the whole method per crop instead, which is not the same).
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import fgc as fgc_lib
from ..backbone import Backbone
from ..text import Vocabulary
from .base import Method, MethodParams, register

log = logging.getLogger("ovseg_ros.engine")

#: Vision towers deeper than this count as ViT-L-like (select_layer -2, logit_scale 50).
VIT_B_DEPTH = 12
#: Floor of the foreground maps before the log (a zeroed query's logit is log(EPS)).
EPS = 1e-6


@dataclass
class CliperParams(MethodParams):
    """CLIPer's hyper-parameters (published defaults; 0 = chosen from the ViT's depth)."""

    logit_scale: float = 0.0  # 0 = auto: 100 for ViT-B (<= 12 blocks), 50 for deeper (ViT-L)
    select_layer: int = 0  # layer whose map is propagated: -1 = last, n > 0 = block n; 0 = auto
    attention_thr: float = 0.2  # zero S_sel below this x its max; FGC: attention threshold
    score_threshold: float = 0.7  # queries whose score is not above this are dropped (VOC21)
    bkg_thre: float = 0.6  # background where every max-normalised map is below this; 0 = off
    fgc: bool = False  # fine-grained compensation with Stable Diffusion (needs diffusers)
    fgc_model: str = fgc_lib.DEFAULT_SD_MODEL  # local diffusers folder or Hugging Face hub id
    fgc_layers: str = ",".join(fgc_lib.DEFAULT_LAYERS)  # chained self-attention layers, in order
    fgc_size: int = 512  # side of the square image given to the VAE (latent grid = size / 8)
    fgc_time_step: int = 45  # index of the noise level in the scheduler's timesteps
    fgc_num_steps: int = 50  # scheduler steps the index refers to
    fgc_seed: int = 0  # seed of the latent noise (fixed: the same frame gives the same map)

    def check(self) -> None:
        """Ranges of the thresholds and FGC settings."""
        if not self.logit_scale >= 0 or self.logit_scale == float("inf"):
            raise ValueError(f"cliper logit_scale must be >= 0 (0 = auto), got {self.logit_scale}")
        for key in ("attention_thr", "score_threshold", "bkg_thre"):
            value = getattr(self, key)
            if not 0.0 <= value < float("inf"):
                raise ValueError(f"cliper {key} must be a number >= 0, got {value}")
        if self.fgc_size <= 0 or self.fgc_size % 8:
            raise ValueError(
                f"cliper fgc_size must be a positive multiple of 8, got {self.fgc_size}"
            )
        if self.fgc_num_steps <= 0:
            raise ValueError(f"cliper fgc_num_steps must be positive, got {self.fgc_num_steps}")
        if not self.fgc_model.strip():
            raise ValueError("cliper fgc_model is empty: give a local folder or a hub id")
        fgc_lib.parse_layers(self.fgc_layers)


# --- early-layer fusion, as pure functions -----------------------------------------------------


def fuse_summed_attention(total: torch.Tensor) -> torch.Tensor:
    """Ã from M = sum_n A^n (B, H, N, N); M is overwritten (float32 in, float32 out)."""
    m = total.float()
    m /= m.sum(dim=-2, keepdim=True)
    m /= m.sum(dim=-1, keepdim=True)
    m = m.add_(m.transpose(-1, -2).clone()).mul_(0.5)
    m = m.sub_(m.mean(dim=-2, keepdim=True)).clamp_min_(0.0)
    return m.div_(m.sum(dim=-1, keepdim=True).clamp_min_(1e-12))


def fuse_attention(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Ã from the per-head attention maps (B, H, N, N) of blocks 1..L-1."""
    total = attentions[0].float().clone()
    for a in attentions[1:]:
        total += a.float()
    return fuse_summed_attention(total)


def run_early_blocks(
    backbone: Backbone, images: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, tuple[int, int]]:
    """Blocks 1..L-1: every block's input F^1..F^L and M = sum of their per-head attention.

    Summing on the fly keeps one N x N map per head in memory instead of L - 1 of them.
    """
    x, grid = backbone.embed(images)
    inputs: list[torch.Tensor] = []
    total: torch.Tensor | None = None
    for block in backbone.blocks[:-1]:
        inputs.append(x)
        x, attn = backbone.run_block_capturing(block, x)
        total = attn if total is None else total.add_(attn)
    inputs.append(x)
    if total is None:
        raise ValueError("cliper needs a ViT with at least two blocks")
    return inputs, total, grid


def reproject(
    backbone: Backbone, inputs: Sequence[torch.Tensor], fused: torch.Tensor
) -> torch.Tensor:
    """(L, B, h*w, D) patch features of every F^n through the last block's V, Ã and out_proj."""
    block = backbone.blocks[-1]
    attn = block.attn
    width = backbone.width
    x = torch.stack(list(inputs))  # (L, B, N, width)
    layers, b, n, _ = x.shape
    w_v = attn.in_proj_weight[2 * width :]
    b_v = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
    v = F.linear(block.ln_1(x), w_v, b_v).view(layers, b, n, backbone.heads, -1).transpose(2, 3)
    mixed = torch.matmul(fused[:, :, 1:].to(v.dtype), v)  # patch rows only: (L, B, H, N-1, d)
    mixed = mixed.transpose(2, 3).reshape(layers, b, n - 1, width)
    return backbone.project(attn.out_proj(mixed))


def query_embeddings(vocab: Vocabulary) -> tuple[torch.Tensor, int]:
    """[foreground queries; background words; normalised mean foreground] and the fg count."""
    fg = vocab.query_class < vocab.num_classes
    emb = vocab.embeddings
    mean_fg = F.normalize(emb[fg].mean(dim=0, keepdim=True), dim=-1)
    return torch.cat([emb[fg], emb[~fg], mean_fg]), int(fg.sum())


def layer_probabilities(
    features: torch.Tensor, vocab: Vocabulary, logit_scale: float
) -> torch.Tensor:
    """P_n: (L, B, Qfg, h*w) foreground probabilities of softmax over fg + bg + mean-fg."""
    text, num_fg = query_embeddings(vocab)
    logits = logit_scale * features.float() @ text.T.to(features.device)  # (L, B, hw, Q+1)
    return torch.softmax(logits, dim=-1)[..., :num_fg].transpose(-1, -2)


def resolve_select_layer(select_layer: int, depth: int) -> int:
    """Python index into the L feature sets: 0 = auto (-1 up to ViT-B depth, else -2)."""
    if select_layer == 0:
        return -1 if depth <= VIT_B_DEPTH else -2
    index = select_layer - 1 if select_layer > 0 else select_layer
    if not -depth <= index < depth:
        raise ValueError(
            f"cliper select_layer {select_layer} is outside this ViT's {depth} layers "
            f"(use -1..-{depth} or 1..{depth}, 0 = auto)"
        )
    return index


def resolve_logit_scale(logit_scale: float, depth: int) -> float:
    """0 = auto: 100 up to ViT-B depth, 50 for deeper towers."""
    if logit_scale > 0:
        return logit_scale
    return 100.0 if depth <= VIT_B_DEPTH else 50.0


def propagate(selected: torch.Tensor, fused: torch.Tensor, threshold: float) -> torch.Tensor:
    """S' = S_sel(thresholded) · mean_heads(Ã)[patches, patches]; selected is (B, Q, hw)."""
    keep = selected >= threshold * selected.amax(dim=-1, keepdim=True)
    s = selected * keep
    return s @ fused.mean(dim=1)[:, 1:, 1:]


def coarse_map(
    probs: torch.Tensor, fused: torch.Tensor, select: int, threshold: float
) -> torch.Tensor:
    """S_c = propagated P_select + mean over all layers of P_n: (B, Q, hw)."""
    return propagate(probs[select], fused, threshold) + probs.mean(dim=0)


def label_logits(
    coarse: torch.Tensor,
    refined: torch.Tensor | None,
    vocab: Vocabulary,
    size: tuple[int, int],
    score_threshold: float,
    bkg_thre: float,
) -> torch.Tensor:
    """(B, Q, H, W) logits whose argmax is CLIPer's labelling (see the module docstring).

    coarse is (B, Qfg, h, w); refined (B, Qfg, s, s) from FGC or None.
    """
    score = coarse.flatten(2).amax(dim=-1)  # (B, Qfg)
    final = coarse
    if refined is not None:
        score = 0.5 * score + 0.5 * refined.flatten(2).amax(dim=-1)
        final = refined
    value = final / (final.flatten(2).amax(dim=-1)[..., None, None] + 1e-5)
    value = value * (score * (score > score_threshold))[..., None, None]
    value = F.interpolate(value.float(), size=size, mode="bilinear", align_corners=False)
    fg = vocab.query_class < vocab.num_classes
    b, q = value.shape[0], len(vocab.query_class)
    out = value.new_full((b, q, *size), math.log(EPS))
    out[:, fg] = torch.log(value.clamp_min(EPS))
    bg = torch.nonzero(~fg).flatten()
    if len(bg):
        out[:, bg[0]] = math.log(max(bkg_thre, 2 * EPS))
    return out


# --- the method ---------------------------------------------------------------------------------


@register
class CLIPer(Method):
    """CLIPer: early-layer attention fusion over every block's features, optional SD refinement."""

    name = "cliper"
    summary = "early-layer fusion of all blocks' attention and features (+ optional SD FGC)"
    Params: ClassVar[type[MethodParams]] = CliperParams

    def __init__(self, params: MethodParams) -> None:
        """Keep params; the Stable Diffusion model is loaded only when FGC is on."""
        super().__init__(params)
        self._fgc: fgc_lib.StableDiffusionAttention | None = None
        self._fgc_lock = threading.Lock()
        self._warned_no_background = False

    def prepare(self, backbone: Backbone) -> None:
        """Load the auxiliary Stable Diffusion model now if FGC is on (ModelLoadError if not)."""
        if self.params.fgc:  # type: ignore[attr-defined]
            self.fgc_model(backbone)

    def release(self) -> None:
        """Drop the Stable Diffusion model (and its GPU memory)."""
        with self._fgc_lock:
            model, self._fgc = self._fgc, None
        if model is not None:
            on_cuda = model.device.type == "cuda"
            del model
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()

    def fgc_model(self, backbone: Backbone) -> fgc_lib.StableDiffusionAttention:
        """The FGC model, loaded on first use on the backbone's device and dtype."""
        p: CliperParams = self.params  # type: ignore[assignment]
        with self._fgc_lock:
            if self._fgc is None:
                self._fgc = fgc_lib.load_stable_diffusion(
                    p.fgc_model,
                    backbone.device,
                    backbone.dtype,
                    p.fgc_layers,
                    size=p.fgc_size,
                    time_step=p.fgc_time_step,
                    num_steps=p.fgc_num_steps,
                    seed=p.fgc_seed,
                )
            return self._fgc

    def coarse(
        self, backbone: Backbone, images: torch.Tensor, vocab: Vocabulary
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """S_c (B, Qfg, h, w) of normalised images, and the patch grid."""
        p: CliperParams = self.params  # type: ignore[assignment]
        depth = backbone.num_layers
        select = resolve_select_layer(p.select_layer, depth)
        scale = resolve_logit_scale(p.logit_scale, depth)
        inputs, total, grid = run_early_blocks(backbone, images)
        fused = fuse_summed_attention(total)
        feats = reproject(backbone, inputs, fused)
        del inputs
        probs = layer_probabilities(feats, vocab, scale)
        s_c = coarse_map(probs, fused, select, p.attention_thr)
        return s_c.reshape(*s_c.shape[:2], *grid), grid

    @torch.inference_mode()
    def logits(self, backbone: Backbone, images: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """Logits (B, Q, H, W) at the input size whose argmax is CLIPer's labelling."""
        p: CliperParams = self.params  # type: ignore[assignment]
        if not vocab.background_words and p.bkg_thre > 0 and not self._warned_no_background:
            self._warned_no_background = True
            log.warning(
                "cliper: the vocabulary has no background words, so bkg_thre cannot mark pixels "
                "unlabeled; every pixel takes its best class"
            )
        s_c, _ = self.coarse(backbone, images, vocab)
        s_f = None
        if p.fgc:
            start = time.perf_counter()
            sd = self.fgc_model(backbone)
            rgb = (images.float() * backbone.std + backbone.mean).clamp_(0.0, 1.0)
            s_f = sd.compensate(rgb, s_c, p.attention_thr)
            if s_f.device.type == "cuda":
                torch.cuda.synchronize(s_f.device)
            self.record_timing("fgc", (time.perf_counter() - start) * 1e3)
        return label_logits(
            s_c, s_f, vocab, tuple(images.shape[-2:]), p.score_threshold, p.bkg_thre
        )
