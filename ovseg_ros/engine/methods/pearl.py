"""PEARL (Pei et al., CVPR 2026): Procrustes-aligned last-block attention + text-aware propagation.

METHODS.md section 7b, with the formulas and constants of the official code (PGSmall/PEARL:
pearl/attn.py, clip/model.py, pearl_ovss.py, configs/). Blocks 1..L-1 run unchanged; in the last
block, per image and head, with q, k the head's queries and keys over all N = 1 + h*w tokens:

1. Weights w_i = |q_i| / sum_j |q_j|, with the CLS token's weight 0 (the sum + 1e-6).
2. Weighted centring: q_c = q - sum_i w_i q_i, k_c = k - sum_i w_i k_i.
3. M = k_c^T q_c (d x d) and its orthogonal polar factor R = M (M^T M)^(-1/2): by default by
   `polar_iters` (5) coupled Newton-Schulz steps on A = M^T M / |M^T M|_F + 1e-6 Id (Y_0 = A,
   Z_0 = Id; T = (3 Id - Z Y) / 2; Y <- Y T; Z <- T Z; R = M Z / sqrt(|M^T M|_F)), or by SVD
   (R = U V^T; align_solver 'svd'). Five steps leave R only nearly orthogonal where M is badly
   conditioned; that is the published behaviour.
4. Scores s q (k R)^T + alpha_kk s k_c k_c^T (s = d^-1/2; the keys are rotated UNcentred, the
   k.k term is centred), softmax over the tokens, in float32; CLS rows and columns take part.
5. out_proj of the heads' A v, with neither residual nor FFN (the official 'reduced' block);
   features ln_post(out) @ proj, logits logit_scale * cos (logit_scale 40).

Then, unless `tlp` is off, the text-aware Laplacian propagation of the frame's logits
(ovseg_ros/engine/tlp.py): it needs every crop and every query, so it runs as the method's frame
step on the stitched maps; the official code applies it to the cosines (before logit_scale), at
the original image's size, after the sliding-window average; so does this, on a grid of about
`grid` x `grid` (80; Cityscapes 224) that the labelling upsamples to the frame.

Published protocol (configs/): short side 336 (Cityscapes 560, COCO-Stuff 336 too), slide
224/112 except VOC21 and VOC20 (whole image), prob_thd 0.1 with a background class (VOC21,
Context-60, COCO-Object), alpha_kk 0.3 for ADE20K and Cityscapes, grid 224 for Cityscapes;
80 ImageNet templates. `ovseg eval --method pearl` applies these (evaluation/cli.py).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import tlp
from ..labeling import DenseMaps
from ..text import Vocabulary
from .base import MethodParams, register
from .last_block import LastBlockMethod, LastBlockParams

#: The official code's guards: the query-norm weights' denominator and the polar step's
#: normalisation floor and ridge (both 1e-6).
WEIGHT_EPS = 1e-6
POLAR_EPS = 1e-6
SOLVERS = ("polar", "svd")


@dataclass
class PearlParams(LastBlockParams):
    """PEARL's hyper-parameters, the official code's defaults (ViT-B/16, configs/base_config)."""

    logit_scale: float = 40.0  # temperature of softmax(logit_scale * cos) over the queries
    keep_residual: bool = False  # 'reduced' last block: no residual ...
    keep_ffn: bool = False  # ... and no FFN
    alpha_kk: float = 0.08  # weight of the centred s k_c k_c^T term (ADE20K, Cityscapes: 0.3)
    align_solver: str = "polar"  # orthogonal factor of M: 'polar' (Newton-Schulz) or 'svd'
    polar_iters: int = 5  # Newton-Schulz steps of the polar solver
    tlp: bool = True  # text-aware Laplacian propagation of the logits (false: alignment only)
    grid: int = 80  # TLP grid: the frame is block-averaged by round(side / grid) (Cityscapes 224)
    text_temperature: float = 0.5  # softmax temperature of the text matrix's cosines
    diag_boost: float = 10.0  # added to the text matrix's diagonal before row normalisation
    text_coupling: str = "diagonal"  # 'diagonal': the official code's diag(S) P; 'matrix': S P
    edge_sharpness: float = 5.0  # image edge weight exp(-this * |grad| / mean |grad|)
    conf_floor: float = 0.05  # data weight max(confidence, this)^2 (1 + text agreement)
    smoothness: float = 1.0  # weight of the Laplacian against the data term
    cg_iters: int = 25  # conjugate-gradient iterations of the screened Laplacian solve

    def check(self) -> None:
        """Ranges of the alignment and propagation settings."""
        if self.align_solver not in SOLVERS:
            raise ValueError(
                f"pearl align_solver must be one of {SOLVERS}, got {self.align_solver!r}"
            )
        if self.text_coupling not in tlp.COUPLINGS:
            raise ValueError(
                f"pearl text_coupling must be one of {tlp.COUPLINGS}, got {self.text_coupling!r}"
            )
        for key in ("polar_iters", "cg_iters"):
            if getattr(self, key) < 0:
                raise ValueError(f"pearl {key} must be >= 0, got {getattr(self, key)}")
        if self.grid < 1:
            raise ValueError(f"pearl grid must be >= 1, got {self.grid}")
        for key in ("alpha_kk", "diag_boost", "edge_sharpness", "conf_floor", "smoothness"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"pearl {key} must be a number >= 0, got {value}")
        for key in ("text_temperature", "logit_scale"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"pearl {key} must be a positive number, got {value}")


# --- Procrustes alignment, as pure functions ----------------------------------------------------


def query_weights(q: torch.Tensor) -> torch.Tensor:
    """(..., N, 1) weights |q_i| / (sum |q_j| + eps) with the first (CLS) token's set to 0."""
    w = q.norm(dim=-1, keepdim=True)
    w[..., :1, :] = 0.0
    return w / (w.sum(dim=-2, keepdim=True) + WEIGHT_EPS)


def polar_newton_schulz(m: torch.Tensor, iters: int) -> torch.Tensor:
    """M (M^T M)^(-1/2) for (..., d, d) M by coupled Newton-Schulz steps (module docstring)."""
    eye = torch.eye(m.shape[-1], device=m.device, dtype=m.dtype)
    a = m.transpose(-1, -2) @ m
    norm = torch.linalg.matrix_norm(a).clamp_min(POLAR_EPS)[..., None, None]
    y = a / norm + POLAR_EPS * eye
    z = eye.expand_as(a)
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    return m @ (z / norm.sqrt())


def polar_svd(m: torch.Tensor) -> torch.Tensor:
    """U V^T of M = U S V^T; the identity where the SVD fails (as the official code)."""
    try:
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
    except RuntimeError:  # torch.linalg.LinAlgError: no convergence
        return torch.eye(m.shape[-1], device=m.device, dtype=m.dtype).expand_as(m).clone()
    return u @ vh


def procrustes_scores(
    q: torch.Tensor, k: torch.Tensor, alpha_kk: float, solver: str = "polar", iters: int = 5
) -> torch.Tensor:
    """Pre-softmax scores s q (k R)^T + alpha_kk s k_c k_c^T of (B, heads, N, d) q, k (float32)."""
    q, k = q.float(), k.float()
    s = q.shape[-1] ** -0.5
    w = query_weights(q)
    q_c = q - (w * q).sum(dim=-2, keepdim=True)
    k_c = k - (w * k).sum(dim=-2, keepdim=True)
    m = k_c.transpose(-1, -2) @ q_c
    r = polar_newton_schulz(m, iters) if solver == "polar" else polar_svd(m)
    if not alpha_kk:
        return (q * s) @ (k @ r).transpose(-1, -2)
    # Both terms in one product: [s q, a s k_c] . [k R, k_c] (one N x N map written, not three).
    left = torch.cat([q * s, (alpha_kk * s) * k_c], dim=-1)
    right = torch.cat([k @ r, k_c], dim=-1)
    return left @ right.transpose(-1, -2)


# --- the method ---------------------------------------------------------------------------------


@register
class PEARL(LastBlockMethod):
    """PEARL: Procrustes-aligned attention in the last block, then text-aware propagation."""

    name = "pearl"
    summary = (
        "Procrustes-aligned SM(s Q(KR)^T + a s KcKc^T) in the last block (no res/FFN), then "
        "text-aware Laplacian propagation (tlp)"
    )
    Params: ClassVar[type[MethodParams]] = PearlParams

    def __init__(self, params: MethodParams) -> None:
        """Keep params and the text couplings of the last vocabularies bound."""
        super().__init__(params)
        self._texts: list[tuple[torch.Tensor, tlp.TextCoupling]] = []
        self._text_lock = threading.Lock()

    @property
    def has_frame_step(self) -> bool:  # type: ignore[override]
        """The propagation runs on the whole frame's maps, when it is on."""
        return bool(self.params.tlp)  # type: ignore[attr-defined]

    def attention(self, q, k, v, grid):  # noqa: D102 - documented in the base class
        p: PearlParams = self.params  # type: ignore[assignment]
        scores = procrustes_scores(q, k, p.alpha_kk, p.align_solver, p.polar_iters)
        return torch.softmax(scores, dim=-1)

    def text_coupling(self, vocab: Vocabulary) -> tlp.TextCoupling:
        """The text matrix terms of a vocabulary: bound ones are looked up, others computed."""
        emb = vocab.embeddings
        with self._text_lock:
            for known, coupling in self._texts:
                if known is emb:
                    return coupling
        p: PearlParams = self.params  # type: ignore[assignment]
        with torch.inference_mode():
            coupling = tlp.text_coupling(emb, p.text_temperature, p.diag_boost, p.text_coupling)
        with self._text_lock:
            # The last two: a frame started with the previous vocabulary still finds its own.
            self._texts = [(emb, coupling), *self._texts[:1]]
        return coupling

    def bind_vocabulary(self, vocab: Vocabulary) -> None:
        """Compute the text matrix terms once per vocabulary (nothing per frame)."""
        if self.params.tlp:  # type: ignore[attr-defined]
            self.text_coupling(vocab)

    @torch.inference_mode()
    def frame_maps(
        self, maps: DenseMaps, image: torch.Tensor, frame_size: tuple[int, int]
    ) -> DenseMaps:
        """The stitched logits propagated on the TLP grid, as one whole-input map."""
        p: PearlParams = self.params  # type: ignore[assignment]
        start = time.perf_counter()
        text = self.text_coupling(maps.vocab)
        factors = tlp.downsample_factors(frame_size, p.grid)
        stitched, pooled = tlp.stitch_to_grid(
            maps.grids, maps.boxes, maps.crop, maps.padded, maps.size, frame_size, factors, image
        )
        settings = tlp.TLPSettings(p.edge_sharpness, p.conf_floor, p.smoothness, p.cg_iters)
        # The official propagation works on the cosines; logit_scale comes after it.
        # (in place: for 10,000 classes each (Q, h, w) copy is ~200 MB)
        stitched = stitched.div_(p.logit_scale)
        out = tlp.propagate(stitched, pooled, text, settings, inplace=True).mul_(p.logit_scale)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        self.record_timing("tlp", (time.perf_counter() - start) * 1e3)
        return DenseMaps(
            grids=out[None],
            boxes=[(0, 0)],
            crop=maps.size,
            padded=maps.size,
            size=maps.size,
            method=self,
            vocab=maps.vocab,
        )
