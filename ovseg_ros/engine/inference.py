"""Image -> per-query logits: resize, whole-image or sliding-window passes, batched crops."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import Backbone
from .methods import Method
from .text import Vocabulary


def to_tensor(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """HxWx3 uint8 -> (1, 3, H, W) float32 in [0, 1] on device."""
    t = torch.from_numpy(np.ascontiguousarray(rgb)).to(device, non_blocking=True)
    return t.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


#: The long side is capped here (mmseg's test scale (2048, short side) of the published protocol),
#: so that a very elongated image cannot turn into tens of thousands of tokens.
MAX_LONG_SIDE = 2048


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H', W'): short side = short_side, aspect kept, long side at most max(2048, short_side)."""
    long_cap = max(MAX_LONG_SIDE, short_side)
    scale = min(short_side / min(height, width), long_cap / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: torch.Tensor, short_side: int) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking) so the short side is short_side."""
    h, w = image.shape[-2:]
    size = resized_shape(h, w, short_side)
    if size == (h, w):
        return image
    return F.interpolate(
        image, size=size, mode="bilinear", align_corners=False, antialias=size[0] < h
    )


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (bottom, right) so H and W are multiples (zero = mean colour once normalised)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def _crop_logits(
    method: Method, backbone: Backbone, crops: torch.Tensor, vocab: Vocabulary, max_batch: int
) -> torch.Tensor:
    """Logits upsampled to the crop size for a (N, 3, h, w) batch of normalised crops."""
    h, w = crops.shape[-2:]
    padded = pad_to_multiple(crops, backbone.patch_size)
    outs = []
    for start in range(0, crops.shape[0], max_batch):
        logits = method.logits(backbone, padded[start : start + max_batch], vocab)
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        outs.append(logits[..., :h, :w])
    return torch.cat(outs)


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, size); the last one is aligned to the end."""
    if size <= crop:
        return [0]
    count = math.ceil((size - crop) / stride) + 1
    return sorted({min(i * stride, size - crop) for i in range(count)})


def whole_logits(
    method: Method, backbone: Backbone, image: torch.Tensor, vocab: Vocabulary
) -> torch.Tensor:
    """(Q, H, W) logits from one pass over the whole normalised (1, 3, H, W) image."""
    return _crop_logits(method, backbone, image, vocab, 1)[0]


def slide_logits(
    method: Method,
    backbone: Backbone,
    image: torch.Tensor,
    vocab: Vocabulary,
    crop: int,
    stride: int,
    max_batch: int,
) -> torch.Tensor:
    """(Q, H, W) logits averaged over overlapping crops of one normalised image, crops batched."""
    _, _, h, w = image.shape
    ch, cw = min(crop, h), min(crop, w)
    boxes = [(y, x) for y in window_starts(h, ch, stride) for x in window_starts(w, cw, stride)]
    crops = torch.cat([image[..., y : y + ch, x : x + cw] for y, x in boxes])
    logits = _crop_logits(method, backbone, crops, vocab, max_batch)
    total = logits.new_zeros((logits.shape[1], h, w))
    count = logits.new_zeros((1, h, w))
    for (y, x), crop_logits in zip(boxes, logits, strict=True):
        total[:, y : y + ch, x : x + cw] += crop_logits
        count[:, y : y + ch, x : x + cw] += 1
    return total / count
