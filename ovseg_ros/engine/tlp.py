"""Text-aware Laplacian propagation (TLP), PEARL's refinement of per-pixel logits (CVPR 2026).

METHODS.md section 7b, with the formulas and constants of the official code (PGSmall/PEARL,
pearl/prop.py and pearl_ovss.py). For one frame with per-query cosine logits X (Q, H, W) at the
frame's size and the normalised image I:

1. Text matrix (bound once per vocabulary): S = rows(SM(T T^T / tau) + boost * Id), T the
   L2-normalised query embeddings, tau = 0.5, boost = 10, rows() dividing by the row sum + 1e-6.
2. Downsampling: factors s_y = max(1, round(H / grid)), s_x likewise (grid = 80); X and I are
   averaged over s_y x s_x blocks (the remainder rows / columns dropped, as avg_pool2d does).
3. P = softmax over the queries of the (unscaled) cosines; confidence c = max_q P; agreement
   a = clamp(sum_q P_q (S P)_q, 0, 1); data weight C = max(c, 0.05)^2 (1 + a).
4. Edge weights between 4-neighbours: g = |gray_i - gray_j| / mean(g) on the gray image
   (0.299 R + 0.587 G + 0.114 B of the normalised channels), w = clamp(exp(-5 g) (1 + t), 0, 1)
   with the text gate t = clamp(sum_q P_q(j) (S P(i))_q, 0, 1) between the two pixels.
5. Solve (C + lambda L) Y = C X with L the weighted graph Laplacian (lambda = 1) by conjugate
   gradient from Y0 = X, 25 iterations, one CG over all queries together (dot products over the
   whole stack); upsample Y bilinearly back to the frame.

Where the code and the paper differ, this follows the code: its `einsum('cc,bcij->bcij', S, P)`
takes the DIAGONAL of S (a repeated index), so steps 3 and 4 use diag(S) * P, not S P; the
engine's `text_coupling` 'diagonal' (default) is that, 'matrix' the full product of the paper.

The engine computes steps 2 and 5's resampling without ever holding the frame-size logits: every
step from a crop's patch grid to the TLP grid (upsampling to the crop, averaging overlapping
crops, resizing to the frame, block averaging) is linear and separable, so it is one small matrix
per axis and crop (stitch_to_grid). Queries beyond a memory budget are solved in chunks (each with
its own CG coefficients); one chunk, the official joint solve, holds about 2,000 queries at 80 x 80.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: The official code's small constants: softmax temperature floor, row normalisation, edge-gradient
#: normalisation (TLP.eps) and the CG denominators' guard.
EPS = 1e-6
CG_EPS = 1e-12
#: Luma weights of the gray image the edge weights are computed on (ITU-R BT.601).
LUMA = (0.299, 0.587, 0.114)
#: Bytes of one query chunk's (Q, h, w) map in the propagation (about 6 such tensors live at once).
CHUNK_BYTES = 32 * 2**20
#: Text couplings: the official code's diag(S) * P, or the paper's S P.
COUPLINGS = ("diagonal", "matrix")


# --- the text side (once per vocabulary) ------------------------------------------------------


def text_matrix(
    embeddings: torch.Tensor, temperature: float, diag_boost: float, rows: slice = slice(None)
) -> torch.Tensor:
    """Rows of S = rows(softmax(T T^T / temperature) + diag_boost * Id) for (Q, D) embeddings."""
    t = F.normalize(embeddings.float(), dim=-1)
    part = t[rows]
    s = torch.softmax(part @ t.T / max(temperature, EPS), dim=1)
    if diag_boost > 0:
        first = range(t.shape[0])[rows].start
        index = torch.arange(part.shape[0], device=s.device)
        s[index, index + first] += diag_boost
        s = s / (s.sum(dim=1, keepdim=True) + EPS)
    return s


@dataclass(frozen=True)
class TextCoupling:
    """What the propagation needs of a vocabulary's text matrix S."""

    diagonal: torch.Tensor  # (Q,) S_qq: the official code's coupling
    matrix: torch.Tensor | None  # (Q, Q) S itself, for the 'matrix' coupling only


def text_coupling(
    embeddings: torch.Tensor, temperature: float, diag_boost: float, coupling: str
) -> TextCoupling:
    """S's diagonal (rows in chunks: no Q x Q matrix for large vocabularies), or all of S."""
    if coupling not in COUPLINGS:
        raise ValueError(f"text coupling must be one of {COUPLINGS}, got {coupling!r}")
    if coupling == "matrix":
        s = text_matrix(embeddings, temperature, diag_boost)
        return TextCoupling(s.diagonal().clone(), s)
    n = embeddings.shape[0]
    step = max(1, CHUNK_BYTES // (4 * max(n, 1)))
    parts = []
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        s = text_matrix(embeddings, temperature, diag_boost, rows)
        parts.append(s[:, rows].diagonal().clone())  # a view would keep every chunk's rows
    return TextCoupling(torch.cat(parts), None)


# --- resampling: crops' patch grids -> the TLP grid, as matrices --------------------------------


def downsample_factors(size: tuple[int, int], grid: int) -> tuple[int, int]:
    """(s_y, s_x) = max(1, round(side / grid)) per side (Python's round, as the official)."""
    return max(1, round(size[0] / grid)), max(1, round(size[1] / grid))


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 weights of 1-D bilinear resizing (align_corners=False), as torch's."""
    if n_in == n_out:
        return torch.eye(n_in, dtype=torch.float64)
    impulses = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)
    return F.interpolate(impulses, size=n_out, mode="linear", align_corners=False)[:, 0].T


def pool_matrix(n_in: int, factor: int) -> torch.Tensor:
    """(n_in // factor, n_in) block averages of `factor` samples (the remainder dropped)."""
    n_out = n_in // factor
    block = torch.arange(n_in) // factor
    return (block.unsqueeze(0) == torch.arange(n_out).unsqueeze(1)).double() / factor


@functools.lru_cache(maxsize=32)
def _axis(
    grid: int, padded: int, crop: int, starts: tuple[int, ...], size: int, frame: int, factor: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis: per-start (out, grid) maps of crop grids, and the (out, size) image map."""
    with torch.inference_mode(False):  # the cache outlives the inference_mode call filling it
        up = resize_matrix(grid, padded)[:crop]  # a crop's grid at the crop's pixels
        count = torch.zeros(size, dtype=torch.float64)
        for s in starts:
            count[s : s + crop] += 1
        to_grid = pool_matrix(frame, factor) @ resize_matrix(size, frame)  # (out, size)
        weighted = to_grid / count.clamp_min(1)  # overlapping crops are averaged
        per_start = torch.stack([weighted[:, s : s + crop] @ up for s in starts])
        return per_start.float(), to_grid.float()


def stitch_to_grid(
    grids: torch.Tensor,
    boxes: Sequence[tuple[int, int]],
    crop: tuple[int, int],
    padded: tuple[int, int],
    size: tuple[int, int],
    frame: tuple[int, int],
    factors: tuple[int, int],
    image: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Crops' (N, Q, h, w) maps -> (Q, H_s, W_s) on the TLP grid, and the image's (3, H_s, W_s).

    Equal to upsampling each crop to its size, averaging overlapping crops on the model input
    (size), resizing to the frame and block-averaging by `factors`, without the full-size maps.
    The boxes must be a product of row and column starts (as inference.dense_maps makes them):
    then a pixel's crop count is separable and so is the whole chain. `image` is the unpadded
    model input (1, 3, H, W).
    """
    ys = tuple(sorted({y for y, _ in boxes}))
    xs = tuple(sorted({x for _, x in boxes}))
    if len(boxes) != len(ys) * len(xs):
        raise ValueError("stitch_to_grid needs crops on a regular grid of row and column starts")
    h, w = grids.shape[-2:]
    wy, iy = _axis(h, padded[0], crop[0], ys, size[0], frame[0], factors[0])
    wx, ix = _axis(w, padded[1], crop[1], xs, size[1], frame[1], factors[1])
    wy, wx = wy.to(grids.device), wx.to(grids.device)
    out = None
    for n, (y, x) in enumerate(boxes):
        part = wy[ys.index(y)] @ grids[n].float() @ wx[xs.index(x)].T
        out = part if out is None else out.add_(part)
    pooled = None
    if image is not None:
        img = image[0].float()[..., : size[0], : size[1]]
        pooled = iy.to(img.device) @ img @ ix.to(img.device).T
    return out, pooled


# --- the propagation --------------------------------------------------------------------------


def to_gray(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (H, W) luma of the (normalised) channels."""
    return LUMA[0] * image[0] + LUMA[1] * image[1] + LUMA[2] * image[2]


def image_edge_weights(gray: torch.Tensor, sharpness: float) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(-sharpness * |gradient| / mean|gradient|) between horizontal / vertical neighbours."""
    gx = (gray[:, 1:] - gray[:, :-1]).abs()
    gy = (gray[1:, :] - gray[:-1, :]).abs()
    wx = torch.exp(-sharpness * gx / (gx.mean() + EPS)) if gx.numel() else gx
    wy = torch.exp(-sharpness * gy / (gy.mean() + EPS)) if gy.numel() else gy
    return wx, wy


def laplacian(x: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor) -> torch.Tensor:
    """L x for (Q, H, W) maps: sum over 4-neighbours j of w_ij (x_i - x_j), vectorised stencils."""
    fx = wx * (x[..., :, 1:] - x[..., :, :-1])  # flow across each horizontal edge
    fy = wy * (x[..., 1:, :] - x[..., :-1, :])
    return F.pad(fx, (1, 0)) - F.pad(fx, (0, 1)) + F.pad(fy, (0, 0, 1, 0)) - F.pad(fy, (0, 0, 0, 1))


class ScreenedLaplacian:
    """x -> C x + lambda L x as five in-place stencil kernels (the solver's inner loop)."""

    def __init__(
        self, data: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor, smoothness: float
    ) -> None:
        """Fold the Laplacian's degree into the diagonal: C + lambda deg, minus the neighbours."""
        degree = F.pad(wx, (1, 0)) + F.pad(wx, (0, 1)) + F.pad(wy, (0, 0, 1, 0))
        degree = degree + F.pad(wy, (0, 0, 0, 1))
        self.center = data + smoothness * degree
        self.wx = smoothness * wx
        self.wy = smoothness * wy

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(C + lambda L) x for (Q, H, W) x, into `out` when given."""
        out = torch.mul(x, self.center, out=out)
        out[..., :, 1:].addcmul_(self.wx, x[..., :, :-1], value=-1.0)
        out[..., :, :-1].addcmul_(self.wx, x[..., :, 1:], value=-1.0)
        out[..., 1:, :].addcmul_(self.wy, x[..., :-1, :], value=-1.0)
        out[..., :-1, :].addcmul_(self.wy, x[..., 1:, :], value=-1.0)
        return out


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of a * b over every element, as a 0-d tensor (no host sync on a GPU)."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def conjugate_gradient(
    apply: Callable[..., torch.Tensor], b: torch.Tensor, x0: torch.Tensor, iters: int
) -> torch.Tensor:
    """`iters` CG steps on apply(x) = b from x0, dot products over the whole tensor.

    apply(x, out) may write into `out` (ScreenedLaplacian does); the updates are in place.
    """
    x = x0.clone()
    r = b - apply(x)
    p = r.clone()
    ap = torch.empty_like(p)
    rs = _dot(r, r)
    for _ in range(iters):
        ap = apply(p, out=ap)
        alpha = rs / (_dot(p, ap) + CG_EPS)
        x.addcmul_(p, alpha)
        r.addcmul_(ap, alpha, value=-1.0)
        rs_new = _dot(r, r)
        p.mul_(rs_new / (rs + CG_EPS)).add_(r)
        rs = rs_new
    return x


@dataclass(frozen=True)
class TLPSettings:
    """The propagation's constants (published defaults in PEARL's parameters)."""

    edge_sharpness: float = 5.0
    conf_floor: float = 0.05
    smoothness: float = 1.0
    cg_iters: int = 25


def _chunks(n: int, per_item: int) -> list[slice]:
    """Slices of at most CHUNK_BYTES // per_item items covering range(n)."""
    step = max(1, CHUNK_BYTES // max(per_item, 1))
    return [slice(s, min(n, s + step)) for s in range(0, n, step)]


def propagation_weights(
    logits: torch.Tensor, gray: torch.Tensor, text: TextCoupling | None, settings: TLPSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Data weight C (H, W) and edge weights (H, W-1), (H-1, W) of (Q, H, W) cosine logits."""
    q, h, w = logits.shape
    chunks = _chunks(q, 4 * h * w)
    top = torch.stack([logits[c].amax(dim=0) for c in chunks]).amax(dim=0)
    total = sum((logits[c] - top).exp().sum(dim=0) for c in chunks)
    lse = top + torch.log(total)
    conf = (top - lse).exp()  # the best query's probability
    agree = torch.zeros_like(top)
    gate_x = torch.zeros_like(top[:, 1:])
    gate_y = torch.zeros_like(top[1:, :])
    if text is not None:
        full = None
        if text.matrix is not None:
            probs = (logits - lse).exp()
            full = torch.einsum("cd,dij->cij", text.matrix.to(logits.device), probs)
        for c in chunks:
            p = (logits[c] - lse).exp()
            sp = full[c] if full is not None else text.diagonal[c].to(p.device).view(-1, 1, 1) * p
            agree += (p * sp).sum(dim=0)
            gate_x += (p[:, :, 1:] * sp[:, :, :-1]).sum(dim=0)
            gate_y += (p[:, 1:, :] * sp[:, :-1, :]).sum(dim=0)
    data = conf.clamp_min(settings.conf_floor).square() * (1.0 + agree.clamp(0.0, 1.0))
    wx, wy = image_edge_weights(gray, settings.edge_sharpness)
    if text is not None:
        wx = (wx * (1.0 + gate_x.clamp(0.0, 1.0))).clamp(0.0, 1.0)
        wy = (wy * (1.0 + gate_y.clamp(0.0, 1.0))).clamp(0.0, 1.0)
    return data, wx, wy


def propagate(
    logits: torch.Tensor,
    image: torch.Tensor,
    text: TextCoupling | None,
    settings: TLPSettings = TLPSettings(),
    inplace: bool = False,
) -> torch.Tensor:
    """Y solving (C + lambda L) Y = C X by CG for (Q, H, W) cosine logits X, a (3, H, W) image.

    `inplace`: Y overwrites X (when X is float32; the caller's X is then gone), which saves a
    (Q, H, W) copy for large vocabularies. Each chunk's solution is written as it is found.
    """
    x = logits.float()
    data, wx, wy = propagation_weights(x, to_gray(image.float()), text, settings)
    apply = ScreenedLaplacian(data, wx, wy, settings.smoothness)
    q, h, w = x.shape
    out = x if inplace else torch.empty_like(x)
    # One chunk (every query, the official joint solve) unless the maps are large (docstring).
    for c in _chunks(q, 4 * h * w):
        out[c] = conjugate_gradient(apply, data * x[c], x[c], settings.cg_iters)
    return out
