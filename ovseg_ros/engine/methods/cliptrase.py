"""CLIPtrase (Shao et al., ECCV 2024): self-correlation recalibration and region voting.

METHODS.md section 3. For normalised images (B, 3, H, W) on an h x w patch grid (N = 1 + hw):

1. Last block: A = SM(s QQ^T) + SM(s KK^T) + SM(s VV^T), CLS included; residual and FFN kept;
   patch logits = logit_scale (100) * cos(feature, query).
2. Patch self-correlation of block L-1 (its normal forward, unchanged):
   C = mean over heads of [cos(q_i, q_j) + cos(k_i, k_j) + cos(v_i, v_j)] / 3, an N x N matrix.
3. "Global" patches removed: C'_ij = max(0, C_ij - C_CLS,j) for patches i, j (hw x hw).
4. DBSCAN (scikit-learn, euclidean) over the rows of C'. Each cluster's mean row is an h x w
   map; maps are upsampled x`upsample` bilinearly, median-filtered (`median_size`, scipy's
   reflect border), upsampled bilinearly to the input size; the argmax gives a region map.
5. Vote on the input-size pixels: each pixel's label is the group (class, or the background
   group of the background words) of its best query on the bilinearly upsampled patch logits.
   `majority` (published default): each region takes its most frequent label; pixels that
   already have it keep their logits, the others get the logits of the region's representative
   (the agreeing pixel nearest to the agreeing pixels' mean logits), so the engine's softmax and
   argmax give the voted label with a typical confidence. `mean` (the detectron2 variant): every
   pixel gets its region's mean logits. Without any cluster the logits are left as they are.

The logits come back at the input size (B, Q, H, W) since the regions are pixel-accurate.

DBSCAN parameters follow the grid, as published (eps 0.7 / min_samples 3 at 224 px = 196 patches,
1.1 / 7 at 336 px = 441 patches): between and beyond these two settings they are interpolated
log-log in the number of patches, eps(N) = eps_224 (N/196)^a and min_samples(N) =
round(min_samples_224 (N/196)^b), which reproduces both published pairs exactly.

Robot budget: DBSCAN's cost grows with (rows clustered)^2 x N. At most `max_cluster_patches`
rows are clustered: beyond that, every k-th patch in raster order is clustered (k = ceil(N /
max)), min_samples is scaled by the fraction kept (the neighbourhoods thin out by that factor),
eps stays (the rows keep all N columns), and the cluster maps are the means of the kept rows.
With the default (1024) a 640x480 frame at short side 336 (21 x 28 = 588 patches) and every
224/336-pixel crop are clustered exactly as published. The clustering time (distances + DBSCAN)
is reported per frame as the "cluster" timing, the region maps and vote as "regions".

Differences from the published protocol: it resizes and centre-crops a square image (224 or 336);
the engine uses the common protocol (short side, whole image or sliding crops) and the engine's
background handling (background words and/or thresholds).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..backbone import Backbone
from ..clip_weights import ModelLoadError
from ..text import Vocabulary
from .base import register
from .last_block import LastBlockMethod, LastBlockParams, softmax_scores

#: Patches of the two published settings (224 and 336 pixels with 16-pixel patches).
PATCHES_224 = 196
PATCHES_336 = 441
VOTES = ("majority", "mean")


@dataclass
class CLIPtraseParams(LastBlockParams):
    """CLIPtrase's hyper-parameters (published defaults, ViT-B/16).

    Published: square centre crop of 224 (eps 0.7, min_samples 3) or 336 (eps 1.1,
    min_samples 7), whole image, patch logits x 100, background words without threshold.
    """

    logit_scale: float = 100.0  # patch logits x 100 before the vote and the softmax
    keep_residual: bool = True  # last block: x + O(A)
    keep_ffn: bool = True  # ... + MLP(ln_2(.))
    eps_224: float = 0.7  # DBSCAN eps published for 196 patches (224 px)
    min_samples_224: int = 3  # DBSCAN min_samples published for 196 patches
    eps_336: float = 1.1  # DBSCAN eps published for 441 patches (336 px)
    min_samples_336: int = 7  # DBSCAN min_samples published for 441 patches
    eps: float = 0.0  # fixed eps for every grid; 0 = follow the grid (see the module docstring)
    min_samples: int = 0  # fixed min_samples for every grid; 0 = follow the grid
    max_cluster_patches: int = 1024  # budget: rows clustered at most (raster subsampling beyond)
    upsample: int = 4  # cluster maps upsampled x this before the median filter
    median_size: int = 7  # median filter window on the upsampled maps (published 2 * 4 - 1)
    vote: str = "majority"  # region vote: 'majority' label, or 'mean' region-averaged logits

    def check(self) -> None:
        """Positive DBSCAN settings, sizes >= 1, a known vote."""
        for key in ("eps_224", "eps_336"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"cliptrase {key} must be a positive number, got {value}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"cliptrase eps must be >= 0 (0 = follow the grid), got {self.eps}")
        for key in ("min_samples_224", "min_samples_336", "max_cluster_patches"):
            if getattr(self, key) < 1:
                raise ValueError(f"cliptrase {key} must be >= 1, got {getattr(self, key)}")
        for key in ("min_samples", "upsample", "median_size"):
            low = 0 if key == "min_samples" else 1
            if getattr(self, key) < low:
                raise ValueError(f"cliptrase {key} must be >= {low}, got {getattr(self, key)}")
        if self.vote not in VOTES:
            raise ValueError(f"cliptrase vote must be one of {list(VOTES)}, got {self.vote!r}")


def patch_correlation(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, N, N) mean over heads of [cos(q_i,q_j) + cos(k_i,k_j) + cos(v_i,v_j)] / 3."""
    total = None
    for t in (q, k, v):
        unit = F.normalize(t.float(), dim=-1)
        cos = torch.matmul(unit, unit.transpose(-1, -2)).mean(dim=1)
        total = cos if total is None else total + cos
    return total / 3.0


def remove_global(corr: torch.Tensor) -> torch.Tensor:
    """C'_ij = max(0, C_ij - C_CLS,j) on the patches: (B, N, N) -> (B, hw, hw)."""
    return (corr[:, 1:, 1:] - corr[:, :1, 1:]).clamp_min(0.0)


def dbscan_settings(p: CLIPtraseParams, patches: int, clustered: int) -> tuple[float, int]:
    """(eps, min_samples) for a grid of `patches` of which `clustered` rows are clustered."""
    ratio = math.log(PATCHES_336 / PATCHES_224)
    rel = patches / PATCHES_224
    eps = p.eps if p.eps > 0 else p.eps_224 * rel ** (math.log(p.eps_336 / p.eps_224) / ratio)
    if p.min_samples > 0:
        return eps, p.min_samples
    power = math.log(p.min_samples_336 / p.min_samples_224) / ratio
    count = p.min_samples_224 * rel**power * clustered / patches
    return eps, max(1, round(count))


def sample_rows(patches: int, budget: int) -> torch.Tensor:
    """Indices of the rows clustered: all, or every k-th in raster order to stay within budget."""
    step = max(1, math.ceil(patches / budget))
    return torch.arange(0, patches, step)


def cluster_maps(recal: torch.Tensor, p: CLIPtraseParams) -> torch.Tensor:
    """(K, hw) mean rows of the DBSCAN clusters of recal's rows (K may be 0)."""
    from sklearn.cluster import DBSCAN

    patches = recal.shape[0]
    index = sample_rows(patches, p.max_cluster_patches).to(recal.device)
    rows = recal[index].float()
    eps, min_samples = dbscan_settings(p, patches, len(index))
    dist = torch.cdist(rows, rows).clamp_min_(0.0)
    dist.fill_diagonal_(0.0)
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(
        dist.cpu().numpy()
    )
    ids = np.unique(labels[labels >= 0])
    if len(ids) == 0:
        return rows.new_zeros((0, patches))
    member = torch.from_numpy(labels).to(rows.device)
    onehot = (member[None, :] == torch.from_numpy(ids).to(rows.device)[:, None]).float()
    return (onehot @ rows) / onehot.sum(dim=1, keepdim=True)


def region_map(
    maps: torch.Tensor, size: tuple[int, int], upsample: int, median_size: int
) -> torch.Tensor:
    """(K, h, w) cluster maps -> (H, W) long region ids: up x upsample, median, up, argmax."""
    from scipy.ndimage import median_filter

    h, w = maps.shape[-2:]
    up = F.interpolate(
        maps[None].float(), size=(h * upsample, w * upsample), mode="bilinear", align_corners=False
    )[0]
    if median_size > 1:
        filtered = median_filter(up.cpu().numpy(), size=(1, median_size, median_size))
        up = torch.from_numpy(filtered).to(maps.device)
    full = F.interpolate(up[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return full.argmax(dim=0)


def region_vote(
    logits: torch.Tensor,
    regions: torch.Tensor,
    num_regions: int,
    query_class: torch.Tensor,
    groups: int,
    vote: str = "majority",
) -> torch.Tensor:
    """Region-voted (Q, H, W) logits from (Q, H, W) logits and an (H, W) region map."""
    nq = logits.shape[0]
    flat = logits.reshape(nq, -1).float()  # (Q, P), pixels contiguous
    reg = regions.reshape(-1)
    k = num_regions
    if vote == "mean":
        sums = flat.new_zeros((nq, k)).index_add_(1, reg, flat)
        counts = torch.bincount(reg, minlength=k).clamp_min(1)
        return (sums / counts).index_select(1, reg).reshape(logits.shape)
    group = query_class.to(reg.device)[flat.max(dim=0).indices]
    votes = torch.bincount(reg * groups + group, minlength=k * groups).view(k, groups)
    winner = votes.argmax(dim=1)  # ties: the lowest group id
    agree = group == winner[reg]
    a_idx = torch.nonzero(agree).squeeze(1)
    a_reg = reg[a_idx]
    a_logits = flat.index_select(1, a_idx)  # (Q, A)
    counts = torch.bincount(a_reg, minlength=k).clamp_min(1)
    mean = flat.new_zeros((nq, k)).index_add_(1, a_reg, a_logits) / counts
    dist = (a_logits - mean.index_select(1, a_reg)).pow_(2).sum(dim=0)
    best = dist.new_full((k,), float("inf")).scatter_reduce(0, a_reg, dist, reduce="amin")
    nearest = dist == best[a_reg]
    rep = torch.full((k,), flat.shape[1], dtype=torch.long, device=reg.device)
    rep = rep.scatter_reduce(0, a_reg[nearest], a_idx[nearest], reduce="amin")
    source = torch.where(agree, torch.arange(flat.shape[1], device=reg.device), rep[reg])
    return flat.index_select(1, source).reshape(logits.shape)


@register
class CLIPtrase(LastBlockMethod):
    """CLIPtrase: SM(QQ)+SM(KK)+SM(VV) last block, recalibrated correlation clusters, vote."""

    name = "cliptrase"
    summary = "SM(QQ)+SM(KK)+SM(VV) last block + DBSCAN regions of the recalibrated correlation"
    Params = CLIPtraseParams

    def prepare(self, backbone: Backbone) -> None:
        """Check that scikit-learn (DBSCAN) and scipy (median filter) are installed."""
        try:
            import scipy.ndimage  # noqa: F401
            import sklearn.cluster  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(
                f"cliptrase needs scikit-learn and scipy ({exc}); install them with "
                "pip install scikit-learn==1.9.1"
            ) from exc
        if backbone.num_layers < 2:
            raise ModelLoadError("cliptrase needs a vision tower with at least two blocks")

    def attention(self, q, k, v, grid):  # noqa: D102 - documented in the base class
        s = q.shape[-1] ** -0.5
        return softmax_scores(q, q, s) + softmax_scores(k, k, s) + softmax_scores(v, v, s)

    def correlation(self, backbone: Backbone, block_input: torch.Tensor) -> torch.Tensor:
        """(B, hw, hw) recalibrated patch correlation C' of block L-1 for its input tokens."""
        q, k, v = backbone.qkv(backbone.blocks[-2], block_input)
        return remove_global(patch_correlation(q, k, v))

    @torch.inference_mode()
    def logits(self, backbone: Backbone, images: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """(B, Q, H, W) region-voted logits at the input size."""
        p: CLIPtraseParams = self.params  # type: ignore[assignment]
        x, grid, cap = backbone.forward_to_last(images, capture_inputs=True)
        recal = self.correlation(backbone, cap.inputs[-2])
        cap.inputs.clear()
        y, _ = self.last_block(backbone, x, grid)
        patch = self.patch_logits(backbone.project(y[:, 1:]), grid, vocab, p.logit_scale)
        size = tuple(images.shape[-2:])
        logits = F.interpolate(patch, size=size, mode="bilinear", align_corners=False)
        groups = vocab.num_classes + 1
        out = []
        for i in range(logits.shape[0]):
            start = time.perf_counter()
            maps = cluster_maps(recal[i], p)
            mid = time.perf_counter()
            self.record_timing("cluster", (mid - start) * 1e3)
            if maps.shape[0] == 0:  # no cluster: nothing to vote on
                out.append(logits[i])
            else:
                regions = region_map(maps.view(-1, *grid), size, p.upsample, p.median_size)
                k = maps.shape[0]
                out.append(region_vote(logits[i], regions, k, vocab.query_class, groups, p.vote))
            self.record_timing("regions", (time.perf_counter() - mid) * 1e3)
        return torch.stack(out)
