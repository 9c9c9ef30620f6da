"""Per-pixel labels and confidence from a method's per-query outputs, in bounded memory.

The order is the official codes' (METHODS.md section 1; e.g. NACLIP's forward_slide, predict and
postprocess_result): the method's per-query values on its patch grid are upsampled bilinearly to
the model input (each crop to its own size, overlapping crops averaged), then bilinearly to the
frame's size; optional PAMR runs there, on the logits; then the softmax over all queries. A class's
probability is the maximum over its synonyms, so the class of the best query wins and its
probability is the pixel's confidence; a background word winning, the probability threshold and
the area threshold make pixels unlabeled.

Holding every query's logits at the frame's size would take Q x H x W floats (10,000 classes at
640x480: 12 GB), so the queries go through in chunks sized to `chunk_bytes` with an online softmax:
per pixel the best logit so far, its query, and the sum of exp(logit - best) are carried from one
chunk to the next. The result equals the one-shot computation up to float rounding, and memory is
a few maps of the frame plus one chunk, whatever the vocabulary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .refine import pamr_affinity, pamr_propagate

if TYPE_CHECKING:
    from .methods import Method
    from .text import Vocabulary

#: Memory for one chunk of queries' maps (and their temporaries) while labelling a frame.
CHUNK_BYTES = 128 * 2**20

#: Largest input (h * w) that upsample_bilinear enlarges with matrix products: patch grids.
_MATMUL_UPSAMPLE_MAX_INPUT = 4096


@functools.lru_cache(maxsize=64)
def _linear_weights(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D linear interpolation (align_corners=False), as F.interpolate.

    Built by interpolating unit impulses, so the weights are exactly those torch uses.
    """
    # Normal (not inference-mode) tensors: the cache outlives the inference_mode call that fills it.
    with torch.inference_mode(False):
        impulses = torch.eye(n_in, device=device, dtype=torch.float32).unsqueeze(1)
        weights = F.interpolate(impulses, size=n_out, mode="linear", align_corners=False)
        return weights[:, 0].T.contiguous()


@functools.lru_cache(maxsize=64)
def _sampling_weights(n_in: int, n_out: int, scale: float, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) bilinear weights sampling source (i + 0.5) * scale - 0.5 for output i.

    torch's rule for align_corners=False (clamped at 0, the last index repeated at the end), so
    with scale = n_in / n_out the weights are those of F.interpolate.
    """
    with torch.inference_mode(False):
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_(min=0)
        low = src.floor().long().clamp_(max=n_in - 1)
        high = (low + 1).clamp_(max=n_in - 1)
        frac = (src - low).clamp_(max=1.0)
        weights = torch.zeros(n_out, n_in, dtype=torch.float64)
        rows = torch.arange(n_out)
        weights.index_put_((rows, low), 1 - frac, accumulate=True)
        weights.index_put_((rows, high), frac, accumulate=True)
        return weights.to(device=device, dtype=torch.float32)


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of (B, C, h, w) float maps to size (H, W).

    Bilinear interpolation is separable, so enlarging a small patch grid is two small matrix
    products, Ry @ x @ Rx^T: about 4x faster than F.interpolate on the CPU for the 40-odd query
    channels of a 640x480 frame, and the same numbers (to float rounding). Shrinking, and large
    inputs (where the dense matrices cost more than they save), use F.interpolate.
    """
    h, w = x.shape[-2:]
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return x
    if out_h < h or out_w < w or h * w > _MATMUL_UPSAMPLE_MAX_INPUT:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    ry = _linear_weights(h, out_h, x.device).to(x.dtype)
    rx = _linear_weights(w, out_w, x.device).to(x.dtype)
    return torch.matmul(ry, torch.matmul(x, rx.T))


def upsample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) -> (C, H, W) bilinear (align_corners=False); the same tensor when sizes match."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


@dataclass
class DenseMaps:
    """One frame's per-query method outputs on their grids, and how they map onto the image.

    `grids` holds one (Q, h, w) map per crop (slide) or one for the whole model input; each covers
    its crop padded to a patch multiple (`padded`), of which the top-left `crop` pixels are real.
    """

    grids: torch.Tensor  # (N, Q, h, w) float32
    boxes: list[tuple[int, int]]  # top-left (y, x) of each crop in the model input
    crop: tuple[int, int]  # (ch, cw): the real part of a crop
    padded: tuple[int, int]  # the crop padded to a multiple of the patch size
    size: tuple[int, int]  # the model input (H', W')
    method: Method
    vocab: Vocabulary

    @property
    def num_queries(self) -> int:
        """Number of queries (synonyms and background words) in the maps."""
        return int(self.grids.shape[1])

    @property
    def whole(self) -> bool:
        """True when a single pass covered the whole model input."""
        return len(self.boxes) == 1 and self.crop == self.size

    def _crop(self, index: int, queries: slice) -> torch.Tensor:
        """(qc, ch, cw): one crop's maps of some queries at the crop's size."""
        grid = self.grids[index, queries]
        up = upsample_bilinear(grid[None], self.padded)[0, :, : self.crop[0], : self.crop[1]]
        if self.method.has_pixel_step and not self.whole:
            up = self.method.pixel_logits(up, grid, queries, self.vocab)
        return up

    def at_input(self, queries: slice = slice(None)) -> torch.Tensor:
        """(qc, H', W') logits of some queries at the model input (crops merged by averaging)."""
        if self.whole:
            return self._crop(0, queries)
        ch, cw = self.crop
        first = self._crop(0, queries)
        total = first.new_zeros((first.shape[0], *self.size))
        count = first.new_zeros((1, *self.size))
        for index, (y, x) in enumerate(self.boxes):
            total[:, y : y + ch, x : x + cw] += first if index == 0 else self._crop(index, queries)
            count[:, y : y + ch, x : x + cw] += 1
        return total.div_(count)

    def whole_to(self, queries: slice, size: tuple[int, int]) -> torch.Tensor:
        """(qc, H, W): a whole-image pass's maps resampled straight to the frame's size.

        One bilinear step, as the official codes' whole mode (NACLIP's forward_feature with the
        original size, CLIPer's main_ovs): each frame pixel samples the grid at its own position,
        (y + 0.5) * H' / H input pixels, the grid covering the padded input. Without padding this
        is F.interpolate(grid, size) exactly.
        """
        grid = self.grids[0, queries].float()
        (h, w), (ph, pw), (in_h, in_w) = grid.shape[-2:], self.padded, self.size
        ry = _sampling_weights(h, size[0], in_h * h / (size[0] * ph), grid.device)
        rx = _sampling_weights(w, size[1], in_w * w / (size[1] * pw), grid.device)
        return torch.matmul(ry, torch.matmul(grid, rx.T))

    def at_output(
        self, queries: slice, size: tuple[int, int], affinity: torch.Tensor | None
    ) -> torch.Tensor:
        """(qc, H, W) logits of some queries at the frame's size (PAMR'd when affinity is given).

        Whole mode: one resampling from the grid to the frame; slide mode: crops to their size,
        averaged at the model input, then to the frame (the official codes' two orders). Always a
        new tensor, which the caller may overwrite.
        """
        if self.whole:
            x = self.whole_to(queries, size)
        else:
            x = upsample_to(self.at_input(queries), size).float()
        if x.untyped_storage().data_ptr() == self.grids.untyped_storage().data_ptr():
            x = x.clone()  # no resampling happened: the caller works in place, grids must stay
        if self.method.has_pixel_step and self.whole:
            x = self.method.pixel_logits(x, self.grids[0, queries], queries, self.vocab)
        if affinity is not None:
            x = pamr_propagate(x[None], affinity)[0]
        return x


def _chunk_queries(maps: DenseMaps, out_size: tuple[int, int], chunk_bytes: int, pamr: bool) -> int:
    """How many queries fit in one chunk: their maps at the input and at the output, temporaries."""
    h, w = out_size
    per_query = 4 * (2 * maps.size[0] * maps.size[1] + (4 if pamr else 2) * h * w)
    if maps.method.has_pixel_step:
        per_query *= 3  # the method's own full-size temporaries (CLIPer: about 8 maps a query)
    return max(1, min(maps.num_queries, chunk_bytes // max(per_query, 1)))


@dataclass
class PixelLabels:
    """Per-pixel outcome on the labelling device: class ids and the winning probability."""

    labels: torch.Tensor  # (H, W) int32: class id, or the vocabulary's unlabeled value
    confidence: torch.Tensor  # (H, W) float32 in [0, 1]


def label_pixels(
    maps: DenseMaps,
    out_size: tuple[int, int],
    *,
    prob_threshold: float = 0.0,
    area_threshold: float = 0.0,
    pamr_image: torch.Tensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> PixelLabels:
    """Labels and confidence of every pixel of an out_size frame, chunked over the queries.

    pamr_image, the model input (1, 3, H, W) upsampled to out_size, turns PAMR on.
    """
    vocab = maps.vocab
    n = vocab.num_classes
    owner = vocab.query_class.to(maps.grids.device)
    affinity = pamr_affinity(pamr_image) if pamr_image is not None else None
    step = _chunk_queries(maps, out_size, chunk_bytes, affinity is not None)
    chunks = [slice(q, min(q + step, maps.num_queries)) for q in range(0, maps.num_queries, step)]
    kept: torch.Tensor | None = None  # the only chunk's logits, when there is just one

    best = torch.full(out_size, -torch.inf, device=maps.grids.device)
    arg = torch.zeros(out_size, dtype=torch.long, device=best.device)
    sumexp = torch.zeros(out_size, device=best.device)
    for queries in chunks:
        x = maps.at_output(queries, out_size, affinity)
        top, where = x.max(dim=0)
        better = top > best
        arg = torch.where(better, where + queries.start, arg)
        new_best = torch.maximum(best, top)
        sumexp.mul_((best - new_best).exp_())
        if len(chunks) == 1 and area_threshold > 0:
            kept = x  # the area rule needs the logits again: keep them rather than recompute
            sumexp += (x - new_best).exp_().sum(dim=0)
        else:
            sumexp += x.sub_(new_best).exp_().sum(dim=0)
        best = new_best
    confidence = sumexp.reciprocal_()  # the best query's probability: exp(0) / sum
    group = owner[arg]

    if area_threshold > 0 and n:
        # SCLIP: classes covering no more than area_threshold of the labelled pixels lose.
        counts = torch.bincount(group.flatten(), minlength=n + 1)[:n]
        suppressed = counts <= area_threshold * counts.sum()
        if bool(suppressed.any()):
            drop = suppressed[owner.clamp(max=n - 1)] & (owner < n)
            top_kept = torch.full(out_size, -torch.inf, device=best.device)
            for queries in chunks:
                x = kept if kept is not None else maps.at_output(queries, out_size, affinity)
                x = x.masked_fill(drop[queries].view(-1, 1, 1), -torch.inf)
                top, where = x.max(dim=0)
                better = top > top_kept
                arg = torch.where(better, where + queries.start, arg)
                top_kept = torch.maximum(top_kept, top)
            group = owner[arg]
            confidence = (top_kept - best).exp_().mul_(confidence)  # 0 where all were dropped

    unlabeled = (group >= n) | (confidence <= 0)
    if prob_threshold > 0:
        unlabeled |= confidence < prob_threshold
    labels = group.to(torch.int32).masked_fill_(unlabeled, vocab.unlabeled)
    return PixelLabels(labels, confidence)
