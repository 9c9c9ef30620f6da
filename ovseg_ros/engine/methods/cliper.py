"""CLIPer (Sun et al.): early-layer fusion (ELF) and optional fine-grained compensation (FGC).

METHODS.md section 4, as the official code (linsun449/cliper.code) computes it. With A^n the
per-head softmax(s QK^T) of block n < L and F^n the input of block n (n = 1..L, F^L being the
input of the last block):

1. M = sum_n A^n per head. The official code (modified_clip/model.py, CLIPer.custom_attn, called
   once per layer by forward_transformer) divides M IN PLACE by its column sums, then by its row
   sums, on each of its L calls, and fuses from there: the map of layer k (k = 1..L) has had k
   column/row normalisations, and the propagation uses the map of the last call (L of them).
   That side effect produced the published numbers, so it is reproduced:
   M_k = rows(cols(M_{k-1})); Ã_k = rows(clamp(S_k - colmean(S_k), 0)), S_k = (M_k + M_k^T) / 2,
   with rows/cols dividing by row/column sums.
2. For every n: out_n = out_proj(Ã_n · V_L(ln_1^L(F^n))) with the LAST block's V and out_proj (no
   residual, no FFN); f_n = normalize(ln_post(out_n) @ proj) on the patches.
3. P_n = softmax over [foreground queries; background words; mean foreground embedding] of
   logit_scale * cos(f_n, t); the foreground channels are kept.
4. S_sel = P_select with the entries below attention_thr x the query's spatial max zeroed; the
   official code zeroes them in place (CLIPer.forward), so the thresholded map also enters the
   layer mean below. S'_j = sum_i S_sel,i mean_heads(Ã_L)_ij over the patches.
5. Coarse map S_c = S' + mean_n P_n (all L layers, the selected one thresholded).
6. FGC (optional, Stable Diffusion 2.1-base): S_f = A_f S_c on the 64 x 64 latent grid (fgc.py).

Positional table: bilinear by size and rounded through fp16, as the official upsample_pos_emb
(parameter pos_interpolation 'bilinear_fp16'; 'bicubic' gives the common protocol's table).

Labelling (official ovs/main_ovs.py and util/miou.py cam_to_label), done on the upsampled maps
in the engine's per-query pixel step (CLIPer.pixel_logits). Per query, score = max S_c (with FGC:
0.5 max S_f + 0.5 max S_c, ovs/pipeline.py); the map (S_f with FGC, else S_c) is upsampled FIRST
and then V = up / (max up + 1e-5) * score. With is_normalize (VOC21's configs) V is min-max
normalised per query: V = (V - min V) / (max (V - min V) + 1e-6). Queries whose score is not above
score_threshold are zeroed. With bkg_thre > 0, values below bkg_thre are zeroed and a pixel whose
values are all zero is background; with bkg_thre = 0 the official rule makes a pixel background
when (1 - max V)^2 >= max V, i.e. max V <= (3 - sqrt 5) / 2 (the rule also fires for max V >=
(3 + sqrt 5) / 2, which a per-query step cannot see: unreachable with is_normalize, where V < 1).
logits() returns, per foreground query, the map whose grid maximum is the score (S_c itself; with
FGC, S_f scaled to max score), and 0 for background words. pixel_logits() returns log V for the
values that survive, a level just below log(bkg_thre) (or log 0.382 for bkg_thre 0) for the first
background word, and lower, order-keeping values for everything zeroed, so the argmax is the
official label (exactly without FGC; with FGC the scale moves the +1e-5 of the division by a
relative 1e-5 of the map's maximum, since one grid cannot carry both the score and the absolute
size of S_f). In slide mode the step runs per crop. This needs at least one background word in
the vocabulary; without one every pixel takes its best class (a warning says so once).

Published settings (scripts/config): S = 336, whole image; ViT-B/16 select_layer -1, logit_scale
100; ViT-L/14 select_layer -2, logit_scale 50 (both chosen from the depth when left at 0). The
defaults are VOC21's ViT-B/16 labelling: score_threshold 0.7, bkg_thre 0.6 with is_normalize true
(its thresholds are on the min-max normalised scale); the other configs set is_normalize false:
Pascal Context-60 0.45 / 0.45, Context-59 0.3 / 0.3, COCO-Object 0.3 / 0.3, COCO-Stuff 0.1 / 0.1,
ADE20K 0.3 / 0.3, VOC20 0 / 0.001, Cityscapes 0 / 0.0001. attention_thr 0.2 (0.1 for VOC21/VOC20,
0.35 for Cityscapes), shared by ELF and FGC as in the configs.

Feature sets: the published code feeds ln_1 of block n's input for n < L (ln_1^L(ln_1^n(F^n)),
forward_transformer storing ln_x), which is the default here (early_ln_1 true). METHODS.md
specifies F^n, the input of block n itself (early_ln_1 false). The two agree while the ln_1
weights and biases are at their initial values (1, 0), but not for trained weights: with the
LayerNorm parameters and biases of a random ViT-B/16 perturbed by N(0, 0.1), S_c moved by 1.9e-2
and only 67-98% of the labels stayed the same, while early_ln_1 true matched the official code to
6e-8 and 100% of the labels.

Differences from the published code: a row of the fused map that the centring empties is left at
0 instead of NaN; the optional 224/336-pixel sliding window inside the method is not implemented
(the engine's slide mode runs the whole method per crop instead, which is not the same).
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
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
#: The official labelling's denominators: the upsampled map's max + 1e-5 (main_ovs.py) and the
#: min-max normalisation's max + 1e-6 (cam_to_label).
MAP_EPS = 1e-5
NORM_EPS = 1e-6
#: With bkg_thre <= 0, cam_to_label's background score is (1 - max V)^2; it beats max V exactly
#: when max V <= this root of m^2 - 3m + 1 (or above its other root, (3 + sqrt 5) / 2).
SQUARE_RULE_LEVEL = (3.0 - math.sqrt(5.0)) / 2.0
#: Positional-table styles CLIPer accepts (backbone.Backbone.positional_embedding).
POS_INTERPOLATIONS = ("bilinear_fp16", "bicubic")


@dataclass
class CliperParams(MethodParams):
    """CLIPer's hyper-parameters (published defaults; 0 = chosen from the ViT's depth)."""

    logit_scale: float = 0.0  # 0 = auto: 100 for ViT-B (<= 12 blocks), 50 for deeper (ViT-L)
    select_layer: int = 0  # layer whose map is propagated: -1 = last, n > 0 = block n; 0 = auto
    attention_thr: float = 0.2  # zero S_sel below this x its max; FGC: attention threshold
    score_threshold: float = 0.7  # queries whose score is not above this are dropped (VOC21)
    bkg_thre: float = 0.6  # zero values below this; 0 = the (1 - max)^2 background rule
    is_normalize: bool = True  # min-max normalise each query's map before the thresholds (VOC21)
    pos_interpolation: str = "bilinear_fp16"  # positional table: official fp16 bilinear / bicubic
    early_ln_1: bool = True  # feed ln_1^n(F^n) for n < L as the official code (see the docstring)
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
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(
                f"cliper pos_interpolation must be one of {POS_INTERPOLATIONS}, got "
                f"{self.pos_interpolation!r}"
            )
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


def normalise_columns_rows_(m: torch.Tensor) -> torch.Tensor:
    """Divide m (..., N, N) in place by its column sums, then by its row sums; return m."""
    m /= m.sum(dim=-2, keepdim=True)
    m /= m.sum(dim=-1, keepdim=True)
    return m


def fuse_normalised(m: torch.Tensor) -> torch.Tensor:
    """Ã from a column/row-normalised M: symmetrise, centre columns, clamp, normalise rows.

    m is left as it is; the result is a new float32 tensor.
    """
    s = (m.float() + m.float().transpose(-1, -2)) / 2
    s -= s.mean(dim=-2, keepdim=True)
    s.clamp_(min=0.0)
    # The official code divides by the row sum as it is (NaN for an emptied row).
    return s.div_(s.sum(dim=-1, keepdim=True).clamp_min_(1e-12))


def fuse_summed_attention(total: torch.Tensor) -> torch.Tensor:
    """Ã after ONE column/row normalisation of M = sum_n A^n (B, H, N, N); M is overwritten."""
    return fuse_normalised(normalise_columns_rows_(total))


def fuse_attention(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Ã after one normalisation, from the per-head attention maps (B, H, N, N) of blocks < L."""
    total = attentions[0].float().clone()
    for a in attentions[1:]:
        total += a.float()
    return fuse_summed_attention(total)


def fused_attention_per_layer(total: torch.Tensor, layers: int) -> Iterator[torch.Tensor]:
    """Ã_1 .. Ã_layers, the k-th after k in-place column/row normalisations of total.

    This is the official code's side effect (module docstring, step 1): total is modified.
    """
    for _ in range(layers):
        yield fuse_normalised(normalise_columns_rows_(total))


def run_early_blocks(
    backbone: Backbone, images: torch.Tensor, pos_style: str = "bicubic"
) -> tuple[list[torch.Tensor], torch.Tensor, tuple[int, int]]:
    """Blocks 1..L-1: every block's input F^1..F^L and M = sum of their per-head attention.

    Summing on the fly keeps one N x N map per head in memory instead of L - 1 of them. M is
    float32 whatever the model dtype (the official code sums in the model dtype).
    """
    x, grid = backbone.embed(images, pos_style)
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


def early_features(backbone: Backbone, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The official code's feature sets: ln_1 of block n applied to F^n for n < L, F^L as is."""
    blocks = backbone.blocks
    return [blocks[n].ln_1(x) for n, x in enumerate(inputs[:-1])] + [inputs[-1]]


def reproject_layer(backbone: Backbone, x: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
    """(B, h*w, D) patch features of one feature set through the last block's V, Ã and out_proj."""
    block = backbone.blocks[-1]
    attn = block.attn
    width = backbone.width
    b, n, _ = x.shape
    w_v = attn.in_proj_weight[2 * width :]
    b_v = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
    v = F.linear(block.ln_1(x), w_v, b_v).view(b, n, backbone.heads, -1).transpose(1, 2)
    mixed = torch.matmul(fused[:, :, 1:].to(v.dtype), v)  # patch rows only: (B, H, N-1, d)
    mixed = mixed.transpose(1, 2).reshape(b, n - 1, width)
    return backbone.project(attn.out_proj(mixed))


def reproject(
    backbone: Backbone,
    inputs: Sequence[torch.Tensor],
    fused: torch.Tensor | Sequence[torch.Tensor],
) -> torch.Tensor:
    """(L, B, h*w, D) features of every F^n; fused is one Ã for all or one per feature set."""
    maps = [fused] * len(inputs) if isinstance(fused, torch.Tensor) else list(fused)
    if len(maps) != len(inputs):
        raise ValueError(f"{len(inputs)} feature sets but {len(maps)} fused attention maps")
    return torch.stack([reproject_layer(backbone, x, a) for x, a in zip(inputs, maps, strict=True)])


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


def threshold_selected(selected: torch.Tensor, threshold: float) -> torch.Tensor:
    """S_sel with the entries below threshold x the query's spatial max zeroed: (B, Q, hw)."""
    keep = selected >= threshold * selected.amax(dim=-1, keepdim=True)
    return selected * keep


def propagate(selected: torch.Tensor, fused: torch.Tensor, threshold: float) -> torch.Tensor:
    """S' = S_sel(thresholded) · mean_heads(Ã)[patches, patches]; selected is (B, Q, hw)."""
    return threshold_selected(selected, threshold) @ fused.mean(dim=1)[:, 1:, 1:]


def coarse_map(
    probs: torch.Tensor, fused: torch.Tensor, select: int, threshold: float
) -> torch.Tensor:
    """S_c = propagated P_select + mean over layers with P_select thresholded: (B, Q, hw).

    fused is the map the propagation uses (the last layer's, Ã_L); probs is not modified.
    """
    probs = probs.clone()
    probs[select] = threshold_selected(probs[select], threshold)
    return probs[select] @ fused.mean(dim=1)[:, 1:, 1:] + probs.mean(dim=0)


# --- labelling, as pure functions ---------------------------------------------------------------


def class_scores(coarse: torch.Tensor, refined: torch.Tensor | None = None) -> torch.Tensor:
    """Per-query score (..., Q): max S_c, or 0.5 max S_f + 0.5 max S_c with FGC."""
    score = coarse.amax(dim=(-1, -2))
    if refined is not None:
        score = refined.amax(dim=(-1, -2)) * 0.5 + score * 0.5  # ovs/pipeline.py's order
    return score


def grid_values(coarse: torch.Tensor, refined: torch.Tensor | None = None) -> torch.Tensor:
    """The map logits() returns per query: its grid maximum is the query's score.

    Without FGC that is S_c itself; with FGC it is S_f scaled by score / max S_f (the labelling
    divides by the upsampled maximum, so the scale only moves its 1e-5 by a relative 1e-5).
    """
    if refined is None:
        return coarse
    peak = refined.amax(dim=(-1, -2), keepdim=True)
    score = class_scores(coarse, refined)[..., None, None]
    return refined * torch.where(peak > 0, score / peak.clamp_min(1e-30), 0.0)


def label_values(
    up: torch.Tensor,
    score: torch.Tensor,
    score_threshold: float,
    is_normalize: bool,
) -> torch.Tensor:
    """The official per-query map (..., Q, H, W) before the background rule.

    V = up / (max up + 1e-5) * score; with is_normalize V = (V - min V) / (max(V - min V) +
    1e-6); zero for queries whose score is not above score_threshold.
    """
    v = up.float() / (up.float().amax(dim=(-1, -2), keepdim=True) + MAP_EPS)
    v = v * score[..., None, None]
    if is_normalize:
        v = v - v.amin(dim=(-1, -2), keepdim=True)
        v = v / (v.amax(dim=(-1, -2), keepdim=True) + NORM_EPS)
    return v * (score > score_threshold)[..., None, None]


def background_level(bkg_thre: float) -> float:
    """The value a foreground query must reach to beat the background (bkg_thre or 0.382)."""
    return bkg_thre if bkg_thre > 0 else SQUARE_RULE_LEVEL


def background_logit(bkg_thre: float, dtype: torch.dtype = torch.float32) -> float:
    """The first background word's logit: just below log(level), so that ties go to the class."""
    base = torch.log(torch.tensor(background_level(bkg_thre), dtype=dtype))
    return float(torch.nextafter(base, torch.tensor(-math.inf, dtype=dtype)))


def foreground_logits(values: torch.Tensor, bkg_thre: float) -> torch.Tensor:
    """Logits of the foreground queries from label_values, for an argmax against the background.

    Values that survive (>= bkg_thre; > 0.382 with the bkg_thre 0 rule) give log V, which is at
    least the background logit; zeroed ones give background_logit - 2 + V / level (below it,
    order kept), so without a background word the best value still wins.
    """
    level = background_level(bkg_thre)
    kept = values >= level if bkg_thre > 0 else values > level
    base = background_logit(bkg_thre, values.dtype)
    survived = torch.log(values.clamp_min(level))
    zeroed = (base - 2.0) + values.clamp(0.0, level) / level
    return torch.where(kept, survived, zeroed)


def pixel_logits(
    up: torch.Tensor,
    grid: torch.Tensor,
    foreground: torch.Tensor,
    first_background: int | None,
    score_threshold: float,
    bkg_thre: float,
    is_normalize: bool,
) -> torch.Tensor:
    """(Qc, H, W) logits of a chunk of queries whose argmax is the official CLIPer label.

    up / grid: the chunk's upsampled maps and grid maps (grid_values, one row per query);
    foreground: (Qc,) True for class queries, False for background words; first_background: the
    chunk row of the vocabulary's first background word, or None when it is not in the chunk.
    The other background words get a logit below every other one.
    """
    out = torch.full(up.shape, background_logit(bkg_thre) - 3.0, device=up.device)
    if bool(foreground.any()):
        score = grid[foreground].float().amax(dim=(-1, -2))
        values = label_values(up[foreground], score, score_threshold, is_normalize)
        out[foreground] = foreground_logits(values, bkg_thre)
    if first_background is not None:
        out[first_background] = background_logit(bkg_thre)
    return out


# --- the method ---------------------------------------------------------------------------------


@register
class CLIPer(Method):
    """CLIPer: early-layer attention fusion over every block's features, optional SD refinement."""

    name = "cliper"
    summary = "early-layer fusion of all blocks' attention and features (+ optional SD FGC)"
    Params: ClassVar[type[MethodParams]] = CliperParams
    #: The labelling needs each query's upsampled maximum (module docstring): pixel_logits.
    has_pixel_step: ClassVar[bool] = True

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
        inputs, total, grid = run_early_blocks(backbone, images, p.pos_interpolation)
        if p.early_ln_1:
            inputs = early_features(backbone, inputs)
        feats = []
        layers = fused_attention_per_layer(total, len(inputs))
        fused = total
        # One fused map per layer (k normalisations for layer k); the last one propagates.
        for x, fused in zip(inputs, layers, strict=True):
            feats.append(reproject_layer(backbone, x, fused))
        del inputs, total
        probs = layer_probabilities(torch.stack(feats), vocab, scale)
        s_c = coarse_map(probs, fused, select, p.attention_thr)
        return s_c.reshape(*s_c.shape[:2], *grid), grid

    @torch.inference_mode()
    def logits(self, backbone: Backbone, images: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """(B, Q, h, w) per-query maps for pixel_logits: grid_values, 0 for background words.

        h x w is the patch grid, or FGC's latent grid (fgc_size / 8 squared) with FGC.
        """
        p: CliperParams = self.params  # type: ignore[assignment]
        if not vocab.background_words and not self._warned_no_background:
            self._warned_no_background = True
            log.warning(
                "cliper: the vocabulary has no background words, so no pixel can be marked "
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
        values = grid_values(s_c, s_f).float()
        fg = (vocab.query_class < vocab.num_classes).to(values.device)
        out = values.new_zeros((values.shape[0], len(fg), *values.shape[-2:]))
        out[:, fg] = values
        return out

    def pixel_logits(
        self, up: torch.Tensor, grid: torch.Tensor, queries: slice, vocab: Vocabulary
    ) -> torch.Tensor:
        """Logits of queries[queries] whose argmax is CLIPer's official label (module docstring).

        up: (qc, H, W) the logits() maps of those queries upsampled to the image (or crop) size;
        grid: the same queries' (qc, h, w) maps as logits() returned them.
        """
        p: CliperParams = self.params  # type: ignore[assignment]
        rows = torch.arange(len(vocab.query_class))[queries]
        classes = vocab.query_class.cpu()[rows]
        foreground = classes < vocab.num_classes
        background = torch.nonzero(vocab.query_class.cpu() >= vocab.num_classes).flatten()
        first = None
        if len(background):
            hit = torch.nonzero(rows == background[0]).flatten()
            first = int(hit[0]) if len(hit) else None
        return pixel_logits(
            up,
            grid,
            foreground.to(up.device),
            first,
            p.score_threshold,
            p.bkg_thre,
            p.is_normalize,
        )
