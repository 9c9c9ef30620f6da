"""Image -> per-query logits: resize, whole-image or sliding-window passes, batched crops."""

from __future__ import annotations

import functools
import math
import threading

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


class HostStaging:
    """Uploads frames to a CUDA device through a reused page-locked buffer per thread and size.

    A copy from pageable memory makes the driver stage it through its own pinned buffer first;
    copying into one of ours and uploading from there saves that copy and lets the transfer run
    asynchronously. Before the next frame of the same thread overwrites the buffer, it waits for
    the event recorded after the previous upload (at once in Segmenter.segment, which has already
    waited for its results; it matters for callers that keep the logits on the GPU, such as
    dense_logits). On the CPU this is to_tensor.
    """

    def __init__(self, pin: bool | None = None) -> None:
        """pin: use page-locked buffers (default: whenever CUDA is available)."""
        self._pin = torch.cuda.is_available() if pin is None else pin
        self._local = threading.local()

    def buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """This thread's uint8 staging buffer of that shape (allocated on first use)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or tuple(buf.shape) != tuple(shape):
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=self._pin)
            self._local.buf = buf
        return buf

    def upload(self, rgb: np.ndarray, device: torch.device) -> torch.Tensor:
        """HxWx3 uint8 -> (1, 3, H, W) float32 in [0, 1] on device (uint8 crosses the bus)."""
        if device.type != "cuda":
            return to_tensor(rgb, device)
        buf = self.buffer(rgb.shape)
        pending = getattr(self._local, "copied", None)
        if pending is not None:
            pending.synchronize()  # the previous upload from this buffer has finished reading it
        buf.numpy()[...] = rgb
        t = buf.to(device, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self._local.copied = copied
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
        logits = upsample_bilinear(logits, padded.shape[-2:])
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
