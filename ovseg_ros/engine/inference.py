"""Image -> per-query method maps: upload, resize, whole-image or sliding-window passes."""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import Backbone
from .labeling import DenseMaps
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

#: Most patches one ViT pass may see: a whole-image pass is resized to fit (1024 x 1024 at patch
#: 16), and crops are batched so that a batch holds at most this many. Attention is quadratic in
#: the token count: 4096 tokens are 0.8 GB of fp32 attention weights per block for ViT-B/16.
MAX_TOKENS = 4096


def _tokens(height: int, width: int, patch: int) -> int:
    """Patches of a height x width input padded to a multiple of the patch."""
    return math.ceil(height / patch) * math.ceil(width / patch)


def resized_shape(
    height: int, width: int, short_side: int, patch: int = 0, max_tokens: int = MAX_TOKENS
) -> tuple[int, int]:
    """(H', W'): short side = short_side, aspect kept, long side at most max(2048, short_side).

    With a patch size, the result is also shrunk (aspect kept) until it holds at most max_tokens
    patches: the limit of a whole-image pass.
    """
    long_cap = max(MAX_LONG_SIDE, short_side)
    scale = min(short_side / min(height, width), long_cap / max(height, width))
    size = max(1, round(height * scale)), max(1, round(width * scale))
    if patch and _tokens(*size, patch) > max_tokens:
        shrink = math.sqrt(max_tokens * patch * patch / (size[0] * size[1]))
        while True:
            fitted = max(1, math.floor(size[0] * shrink)), max(1, math.floor(size[1] * shrink))
            if _tokens(*fitted, patch) <= max_tokens:
                return fitted
            shrink *= 0.995
    return size


def resize(image: torch.Tensor, short_side: int, patch: int = 0) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking) to resized_shape (token cap with a patch)."""
    h, w = image.shape[-2:]
    size = resized_shape(h, w, short_side, patch)
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


#: Most bytes of per-query maps one frame may hold (crops x queries x their grid); beyond it the
#: frame is refused with the reason, rather than taking the machine's memory.
MAX_GRID_BYTES = 1024 * 2**20


def check_crop_tokens(crop: int, patch: int) -> None:
    """ValueError when one crop x crop window would be more than MAX_TOKENS patches."""
    tokens = _tokens(crop, crop, patch)
    if tokens > MAX_TOKENS:
        raise ValueError(
            f"inference.crop {crop} gives {tokens} patches of {patch} px in one pass; the limit "
            f"is {MAX_TOKENS} (a crop of at most {64 * patch} px)"
        )


def _method_grids(
    method: Method, backbone: Backbone, crops: torch.Tensor, vocab: Vocabulary, max_batch: int
) -> torch.Tensor:
    """(N, Q, h, w) method outputs of padded (N, 3, H, W) crops, in batches within MAX_TOKENS."""
    per_crop = _tokens(crops.shape[-2], crops.shape[-1], method.token_patch(backbone))
    batch = max(1, min(max_batch, MAX_TOKENS // per_crop))
    outs = []
    for start in range(0, crops.shape[0], batch):
        out = method.logits(backbone, crops[start : start + batch], vocab)
        if not outs:
            total = out.element_size() * out[0].numel() * crops.shape[0]
            if total > MAX_GRID_BYTES:
                raise ValueError(
                    f"{crops.shape[0]} crops x {out.shape[1]} queries would hold "
                    f"{total / 2**20:.0f} MB of maps (limit {MAX_GRID_BYTES // 2**20} MB); use a "
                    "larger inference.stride or crop, whole mode, or fewer classes"
                )
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, size); the last one is aligned to the end."""
    if size <= crop:
        return [0]
    count = math.ceil((size - crop) / stride) + 1
    return sorted({min(i * stride, size - crop) for i in range(count)})


def dense_maps(
    method: Method,
    backbone: Backbone,
    image: torch.Tensor,
    vocab: Vocabulary,
    mode: str = "whole",
    crop: int = 224,
    stride: int = 112,
    max_batch: int = 16,
    frame_size: tuple[int, int] | None = None,
) -> DenseMaps:
    """The method's outputs over one normalised (1, 3, H, W) image: one pass, or sliding crops.

    Slide: windows of crop x crop pixels every `stride` (the last one aligned to the end), each
    padded to a patch multiple; their outputs are averaged where they overlap (DenseMaps).
    A method with a frame step (PEARL's propagation) then transforms the maps; `frame_size`, the
    size they will be labelled at, defaults to the image's.
    """
    sizes = None if frame_size is None else [frame_size]
    return dense_maps_batch(method, backbone, image, vocab, mode, crop, stride, max_batch, sizes)[0]


def dense_maps_batch(
    method: Method,
    backbone: Backbone,
    images: torch.Tensor,
    vocab: Vocabulary,
    mode: str = "whole",
    crop: int = 224,
    stride: int = 112,
    max_batch: int = 16,
    frame_sizes: list[tuple[int, int]] | None = None,
) -> list[DenseMaps]:
    """dense_maps of each of B normalised (B, 3, H, W) images of one size, in shared passes.

    The crops (or whole images) of all B frames go through the method together, batched within
    MAX_TOKENS as one frame's crops are, so several cameras of one size cost one ViT pass where
    they fit; each frame's maps are then the same as dense_maps of that frame alone.
    """
    b, _, h, w = images.shape
    if mode == "slide":
        ch, cw = min(crop, h), min(crop, w)
        boxes = [(y, x) for y in window_starts(h, ch, stride) for x in window_starts(w, cw, stride)]
    else:
        ch, cw, boxes = h, w, [(0, 0)]
    crops = torch.cat([images[..., y : y + ch, x : x + cw] for y, x in boxes], dim=1)
    crops = crops.reshape(b * len(boxes), 3, ch, cw)  # frame-major: frame i's crops are together
    padded = pad_to_multiple(crops, backbone.patch_size)
    grids = _method_grids(method, backbone, padded, vocab, max_batch)
    results = []
    for i in range(b):
        maps = DenseMaps(
            grids=grids[i * len(boxes) : (i + 1) * len(boxes)],
            boxes=boxes,
            crop=(ch, cw),
            padded=tuple(padded.shape[-2:]),
            size=(h, w),
            method=method,
            vocab=vocab,
        )
        if getattr(method, "has_frame_step", False):  # stand-ins for a Method may lack the flag
            size = (h, w) if frame_sizes is None else frame_sizes[i]
            maps = method.frame_maps(maps, images[i : i + 1], tuple(size))
        results.append(maps)
    return results
