"""The per-step breakdown of one frame: the functions the engine and the node call, timed one by
one."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..engine import Segmenter
from ..engine.inference import dense_maps, resize
from ..engine.methods.base import collect_timings
from ..engine.segmenter import class_statistics
from .common import photo_frames, size_label, sync_for, time_calls


@dataclass
class StepBreakdown:
    """Median ms of each step of one frame, in pipeline order."""

    size: str
    method: str
    mode: str
    variant: str
    steps: dict[str, float]
    vit_step: str
    segment_ms: float  # Segmenter.segment on the same frame, for comparison with the engine steps
    engine_steps: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        """Sum of the steps."""
        return sum(self.steps.values())

    @property
    def outside_vit_ms(self) -> float:
        """Everything but the ViT forward."""
        return self.total_ms - self.steps[self.vit_step]

    @property
    def outside_vit_share(self) -> float:
        """Share of the frame outside the ViT, 0..1."""
        return self.outside_vit_ms / self.total_ms if self.total_ms > 0 else 0.0

    def shares(self) -> dict[str, float]:
        """Each step's share of the summed frame time (0..1)."""
        total = self.total_ms or 1.0
        return {k: v / total for k, v in self.steps.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready breakdown."""
        out = dataclasses.asdict(self)
        out.update(
            total_ms=self.total_ms,
            outside_vit_ms=self.outside_vit_ms,
            outside_vit_share=self.outside_vit_share,
            shares=self.shares(),
        )
        return out


VIT_STEP = "ViT + method head (method.logits)"
#: Parts of a method's timings (Method.record_timing) that run outside the ViT and get their own
#: step: PEARL's propagation of the frame's logits.
FRAME_STEP_TIMINGS = ("tlp",)


def step_breakdown(
    segmenter: Segmenter,
    size: tuple[int, int] = (480, 640),
    repeats: int = 5,
    mode: str = "whole",
    variant: str = "",
    alpha: float = 0.5,
) -> StepBreakdown:
    """Time each step of one frame the way the node runs it, with the functions it calls.

    Engine steps (Segmenter.segment): the upload (HostStaging) + resize, backbone.normalize,
    method.logits on the whole input or every crop (inference.dense_maps: the ViT), then
    Segmenter._labels (labeling.label_pixels: the logits upsampled to the input and to the frame,
    the softmax over queries, background, thresholds, argmax) and Segmenter._download
    (device->host copy with the per-class statistics). Node steps (pipeline.py, outputs.py):
    decoding the rgb8 Image (decode.image_to_rgb), confidence to 8 bits (viz.confidence_u8), one
    mask per class (viz.class_mask), the overlay with its legend (viz.overlay) and the output
    messages, serialized as the node publishes them (labels, confidence, overlay, masks). The
    frame is a sample photo resized to `size`; each step's figure is the median of `repeats`
    frames after one untimed one.
    """
    from .. import viz

    cfg = segmenter.config.replace(mode=mode)
    backbone, method, vocab = segmenter.backbone, segmenter.method, segmenter.vocabulary
    device = segmenter.device
    sync = sync_for(device)
    rgb = photo_frames(size, 1)[0]
    notes: list[str] = []
    try:
        from ..ros.decode import image_to_rgb
        from ..ros.encode import labels_to_bytes, mono8_to_bytes, rgb_to_bytes, rgb_to_msg

        msg = rgb_to_msg(rgb, None)
    except ImportError as exc:  # no ROS message packages: engine steps only
        msg = None
        notes.append(f"ROS message steps left out ({exc})")
    n = vocab.num_classes
    colors = viz.class_colors(max(n, 1))

    def to_host(pixels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # As Segmenter.segment after _labels: download with the per-class sums, then the
        # fractions, mean scores and counts.
        labels_np, conf_np, counts, sums = segmenter._download(pixels, vocab)
        _, _, counts = class_statistics(counts, sums, labels_np.size)
        return labels_np, conf_np, counts

    samples: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], Any], on_device: bool = False) -> Any:
        start = time.perf_counter()
        out = fn()
        if on_device:
            sync()
        samples.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        return out

    def one_frame() -> None:
        frame = rgb
        if msg is not None:
            frame = timed("decode Image (decode.image_to_rgb)", lambda: image_to_rgb(msg))
        patch = backbone.patch_size if cfg.mode == "whole" else 0
        image = timed(
            "to tensor + resize",
            lambda: resize(segmenter._staging.upload(frame, device), cfg.short_side, patch),
            True,
        )
        normed = timed("normalise", lambda: backbone.normalize(image), True)
        with collect_timings() as parts:
            maps = timed(
                VIT_STEP,
                lambda: dense_maps(
                    method,
                    backbone,
                    normed,
                    vocab,
                    cfg.mode,
                    cfg.crop,
                    cfg.stride,
                    cfg.max_batch,
                    frame_size=frame.shape[:2],
                ),
                True,
            )
        for key in FRAME_STEP_TIMINGS:
            if key in parts:
                samples[VIT_STEP][-1] -= parts[key]
                samples.setdefault(f"method frame step: {key}", []).append(parts[key])
        pixels = timed(
            "labels: upsample, softmax, argmax, thresholds (Segmenter._labels)",
            lambda: segmenter._labels(maps, image, cfg, frame.shape[:2]),
            True,
        )
        labels, conf, counts = timed("device->host copy + per-class stats", lambda: to_host(pixels))
        conf8 = timed("confidence to 8 bits", lambda: viz.confidence_u8(conf))
        masks = timed(
            f"masks ({n}, one per class)", lambda: [viz.class_mask(labels, c) for c in range(n)]
        )
        image_out = timed(
            "overlay + legend (viz.overlay, given the counts as the node gives them)",
            lambda: viz.overlay(
                frame,
                labels,
                colors,
                alpha,
                vocab.names,
                counts=viz.counts_of_classes(counts, labels),
            ),
        )
        if msg is not None:
            header = msg.header
            timed(
                "messages: labels, confidence, overlay, masks (serialized, encode.*_to_bytes)",
                lambda: (
                    labels_to_bytes(labels, header),
                    mono8_to_bytes(conf8, header),
                    rgb_to_bytes(image_out, header),
                    [mono8_to_bytes(m, header) for m in masks],
                ),
            )

    with torch.inference_mode():
        one_frame()
        samples.clear()
        for _ in range(repeats):
            one_frame()
    steps = {k: statistics.median(v) for k, v in samples.items()}
    engine_steps = [
        k
        for k in steps
        if not k.startswith(("decode", "confidence to", "masks", "overlay", "messages"))
    ]
    segment_ms = statistics.median(
        time_calls(lambda: segmenter.segment(rgb), repeats, warmup=0, sync=sync)
    )
    return StepBreakdown(
        size=size_label(size),
        method=cfg.method,
        mode=cfg.mode,
        variant=variant,
        steps=steps,
        vit_step=VIT_STEP,
        segment_ms=segment_ms,
        engine_steps=engine_steps,
        notes=notes,
    )
