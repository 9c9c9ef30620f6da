"""Post-processing of dense logits: PAMR, synonym/background reduction, thresholds."""

from __future__ import annotations

from collections.abc import Sequence

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


def _neighbours(x: torch.Tensor, offsets: list[tuple[int, int]], pad: int) -> torch.Tensor:
    """(B, C, P, H, W): x shifted by every offset, edges replicated."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return torch.stack(
        [xp[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy, dx in offsets], dim=2
    )


def pamr(
    image: torch.Tensor,
    logits: torch.Tensor,
    iterations: int = 10,
    dilations: tuple[int, ...] = (8, 16),
) -> torch.Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth 2020) of (B, K, H, W) logits.

    image is (B, C, H, W) at the logits' resolution. For each pixel, its 8 neighbours at each
    dilation get the affinity softmax_j(-|I_i - I_j| / (0.1 * std_i)) averaged over channels,
    std_i being the standard deviation of the image over the pixel and all of those neighbours;
    the logits are then propagated `iterations` times with these affinities.
    """
    if iterations <= 0:
        return logits
    image = image.float()
    offsets = _offsets(dilations)
    pad = max(dilations)
    nb = _neighbours(image, offsets, pad)  # (B, C, P, H, W)
    std = torch.cat([image.unsqueeze(2), nb], dim=2).std(dim=2, keepdim=True)
    affinity = -(image.unsqueeze(2) - nb).abs() / (1e-8 + 0.1 * std)
    affinity = torch.softmax(affinity.mean(dim=1, keepdim=True), dim=2)  # (B, 1, P, H, W)
    weights = affinity.unbind(dim=2)  # P maps of (B, 1, H, W)
    h, w = logits.shape[-2:]
    out = logits.float()
    for _ in range(iterations):
        xp = F.pad(out, (pad, pad, pad, pad), mode="replicate")
        acc = torch.zeros_like(out)
        for (dy, dx), wgt in zip(offsets, weights, strict=True):
            acc.addcmul_(xp[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w], wgt)
        out = acc
    return out.to(logits.dtype)


def class_probabilities(
    logits: torch.Tensor,
    query_class: torch.Tensor,
    num_groups: int,
    group_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Softmax over queries, then each class's probability = max over its queries.

    logits (Q, H, W); query_class (Q,) maps a query to its group (classes, then background);
    returns (num_groups, H, W). group_sizes (queries per group, when the queries of a group are
    contiguous, as a Vocabulary orders them) selects a faster path without a device sync.
    """
    prob = torch.softmax(logits.float(), dim=0)
    if group_sizes is not None and len(group_sizes) == num_groups:
        if all(n == 1 for n in group_sizes):
            return prob
        parts, start = [], 0
        for n in group_sizes:
            part = prob[start] if n == 1 else prob[start : start + n].amax(dim=0)
            parts.append(part)
            start += n
        return torch.stack(parts)
    out = prob.new_zeros((num_groups,) + prob.shape[1:])
    index = query_class.view(-1, 1, 1).expand_as(prob)
    return out.scatter_reduce(0, index, prob, reduce="amax", include_self=True)


def suppress_small_classes(
    prob: torch.Tensor, num_classes: int, area_threshold: float
) -> torch.Tensor:
    """SCLIP's area threshold: zero classes covering < area_threshold of the labelled pixels."""
    if area_threshold <= 0:
        return prob
    winner = prob.argmax(dim=0)
    counts = torch.bincount(winner.flatten(), minlength=prob.shape[0])[:num_classes].float()
    total = counts.sum()
    keep = counts > area_threshold * total
    scale = torch.ones(prob.shape[0], device=prob.device, dtype=prob.dtype)
    scale[:num_classes] = keep.to(prob.dtype)
    return prob * scale.view(-1, 1, 1)
