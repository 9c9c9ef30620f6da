"""PAMR (pixel-adaptive mask refinement), computed in memory linear in the frame's pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """The 8 neighbour offsets (dy, dx) at each dilation."""
    return [
        (dy * d, dx * d)
        for d in dilations
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dy, dx) != (0, 0)
    ]


def _shifted(xp: torch.Tensor, dy: int, dx: int, pad: int, h: int, w: int) -> torch.Tensor:
    """A view of the padded map xp moved by (dy, dx): the value of each pixel's neighbour."""
    return xp[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def pamr_affinity(image: torch.Tensor, dilations: tuple[int, ...] = (8, 16)) -> torch.Tensor:
    """PAMR's (P, B, 1, H, W) neighbour weights of a (B, C, H, W) image (they sum to 1 over P).

    For each pixel, its 8 neighbours at each dilation (edges replicated) get the affinity
    softmax_j(mean_c(-|I_i - I_j| / (1e-8 + 0.1 * std_i))), std_i being the per-channel standard
    deviation (unbiased) of the image over the pixel and all of those neighbours. The neighbours are
    views of one padded copy, so memory is P + a few maps of H x W, not C x P of them.
    """
    image = image.float()
    offsets = _offsets(dilations)
    pad = max(dilations)
    h, w = image.shape[-2:]
    xp = F.pad(image, (pad, pad, pad, pad), mode="replicate")
    count = len(offsets) + 1
    mean = image.clone()
    for dy, dx in offsets:
        mean += _shifted(xp, dy, dx, pad, h, w)
    mean /= count
    var = (image - mean).square_()
    for dy, dx in offsets:
        var += (_shifted(xp, dy, dx, pad, h, w) - mean).square_()
    denom = var.div_(count - 1).sqrt_().mul_(0.1).add_(1e-8)
    del mean
    b = image.shape[0]
    affinity = torch.empty((len(offsets), b, 1, h, w), dtype=image.dtype, device=image.device)
    for j, (dy, dx) in enumerate(offsets):
        diff = (image - _shifted(xp, dy, dx, pad, h, w)).abs_().div_(denom)
        affinity[j] = -diff.mean(dim=1, keepdim=True)
    return torch.softmax(affinity, dim=0)


def pamr_propagate(
    logits: torch.Tensor,
    affinity: torch.Tensor,
    iterations: int = 10,
    dilations: tuple[int, ...] = (8, 16),
) -> torch.Tensor:
    """Propagate (B, K, H, W) logits `iterations` times with pamr_affinity's weights.

    Channels do not interact, so a chunk of the queries can be refined on its own.
    """
    if iterations <= 0:
        return logits
    offsets = _offsets(dilations)
    pad = max(dilations)
    h, w = logits.shape[-2:]
    out = logits.float()
    for _ in range(iterations):
        xp = F.pad(out, (pad, pad, pad, pad), mode="replicate")
        acc = torch.zeros_like(out)
        for (dy, dx), weight in zip(offsets, affinity, strict=True):
            acc.addcmul_(_shifted(xp, dy, dx, pad, h, w), weight)
        out = acc
    return out.to(logits.dtype)


def pamr(
    image: torch.Tensor,
    logits: torch.Tensor,
    iterations: int = 10,
    dilations: tuple[int, ...] = (8, 16),
) -> torch.Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth 2020) of (B, K, H, W) logits.

    image is (B or 1, C, H, W) at the logits' resolution; see pamr_affinity and pamr_propagate.
    """
    if iterations <= 0:
        return logits
    return pamr_propagate(logits, pamr_affinity(image, dilations), iterations, dilations)
