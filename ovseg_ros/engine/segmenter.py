"""Segmenter: the engine's one entry point (vocabulary versions, device, precision, Result)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbone import Backbone, build_backbone, default_cache_root
from .config import SegmenterConfig
from .inference import HostStaging, check_crop_tokens, dense_maps_batch, resize
from .labeling import DenseMaps, PixelLabels, label_pixels, upsample_to
from .methods import Method, create_method
from .methods.base import collect_timings
from .text import Progress, TextEncoder, Vocabulary, build_vocabulary


@dataclass(frozen=True)
class Result:
    """One segmented frame, at the input's resolution, with the vocabulary that labelled it."""

    labels: np.ndarray  # (H, W) uint8 with 255 = unlabeled, or uint16 with 65535 beyond 255 classes
    confidence: np.ndarray  # (H, W) float32 in [0, 1]: probability of the pixel's winning group
    fractions: np.ndarray  # (C,) float32: share of the image's pixels labelled with each class
    scores: np.ndarray  # (C,) float32: mean confidence over each class's pixels (0 if absent)
    counts: np.ndarray  # (C,) int64: pixels labelled with each class (exact; fractions' numerators)
    vocabulary: Vocabulary  # the class map the label ids refer to
    timings: dict[str, float]  # ms: model (resize + network), postprocess, total + method's parts

    @property
    def version(self) -> int:
        """Version of the vocabulary used for this frame."""
        return self.vocabulary.version

    @property
    def unlabeled(self) -> int:
        """The label value meaning unlabeled/background."""
        return self.vocabulary.unlabeled

    def present(self) -> list[int]:
        """Ids of the classes that label at least one pixel, largest first."""
        ids = np.flatnonzero(self.fractions > 0)
        return [int(i) for i in ids[np.argsort(-self.fractions[ids], kind="stable")]]

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: vocabulary version, classes present, fractions, timings."""
        names = self.vocabulary.names
        return {
            "vocabulary_version": self.version,
            "size": [int(self.labels.shape[0]), int(self.labels.shape[1])],
            "unlabeled_fraction": float(np.mean(self.labels == self.unlabeled)),
            "classes": [
                {
                    "id": i,
                    "name": names[i],
                    "fraction": round(float(self.fractions[i]), 6),
                    "score": round(float(self.scores[i]), 6),
                }
                for i in self.present()
            ],
            "timings_ms": {k: round(v, 3) for k, v in self.timings.items()},
        }


def class_statistics(
    counts: np.ndarray, sums: np.ndarray, pixels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Result's per-class fields from the downloaded pixel counts and confidence sums:
    (fractions float32, mean scores float32 (0 where absent), counts int64)."""
    fractions = (counts / pixels).astype(np.float32)
    scores = np.where(counts > 0, sums / np.maximum(counts, 1), 0).astype(np.float32)
    return fractions, scores, counts.astype(np.int64)


def load_backbone(cfg: SegmenterConfig) -> Backbone:
    """Load the model that a config names, on its device and precision."""
    return build_backbone(
        cfg.model_name,
        cfg.model_pretrained,
        cfg.model_checkpoint,
        cfg.model_cache_dir,
        cfg.device,
        cfg.precision,
        cfg.quantize,
        cfg.compile,
    )


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Accept HxWx3 uint8 RGB; convert HxW / HxWx1 gray and HxWx4 RGBA; reject the rest."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0-255), got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"image must be HxWx3 RGB (or HxW gray, HxWx4 RGBA), got shape {image.shape}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        return image[:, :, :3]
    return image


class Segmenter:
    """Open-vocabulary segmentation of RGB images with a CLIP ViT and a registered method."""

    def __init__(
        self,
        config: SegmenterConfig | None = None,
        *,
        backbone: Backbone | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Load the model (or reuse a backbone), build the method and the initial vocabulary."""
        self.config = (config or SegmenterConfig()).validate()
        cfg = self.config
        self.backbone = backbone or load_backbone(cfg)
        cache = (
            None
            if cfg.text_cache_dir in ("none", "off")
            else (
                Path(cfg.text_cache_dir).expanduser()
                if cfg.text_cache_dir
                else default_cache_root() / "text"
            )
        )
        self.text = TextEncoder(
            self.backbone.model, cfg.model_name, self.backbone.device, self.backbone.dtype, cache
        )
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._staging = HostStaging()
        self._lock = threading.Lock()
        self._version = 0
        self._in_flight: dict[int, int] = {}  # id(method) -> frames using it now
        self.method: Method = create_method(cfg.method, cfg.method_params)
        self.check(cfg, self.method)
        self.method.prepare(self.backbone)
        self._vocab: Vocabulary = self._build_vocab(
            cfg.vocabulary, cfg.background_words, cfg.templates, progress
        )
        self.method.bind_vocabulary(self._vocab)

    def check(self, config: SegmenterConfig, method: Method | None = None) -> None:
        """ValueError when `config` (with `method`, default the current one) cannot run here.

        The parameters' ranges are checked by the config itself; this adds what depends on the
        loaded model: a slide window's patch count at the finest patch the method uses.
        """
        method = method or self.method
        check_crop_tokens(config.crop, method.token_patch(self.backbone))

    @property
    def device(self) -> torch.device:
        """Where inference runs."""
        return self.backbone.device

    def close(self) -> None:
        """Release the method's auxiliary models and drop this segmenter's model references.

        The segmenter is unusable afterwards; the backbone's memory is freed once nobody else
        holds it (a backbone passed in by the caller stays theirs). Call memory.free_memory()
        afterwards to hand the memory back to the system.
        """
        with self._lock:
            method = self.method
        method.release()
        self.text = None
        self.backbone = None
        self._staging = None

    @property
    def vocabulary(self) -> Vocabulary:
        """The vocabulary in use now."""
        return self._vocab

    def _build_vocab(
        self,
        entries: Sequence[str],
        background: Sequence[str],
        templates: str,
        progress: Progress | None,
    ) -> Vocabulary:
        """Encode a vocabulary and number it with the next version (only once it is valid)."""
        vocab = build_vocabulary(self.text, 0, entries, background, templates, progress)
        with self._lock:
            self._version += 1
            return dataclasses.replace(vocab, version=self._version)

    def set_vocabulary(
        self,
        entries: Sequence[str],
        background_words: Sequence[str] | None = None,
        templates: str | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Encode a new vocabulary, swap it in atomically and return its version.

        Invalid entries raise ValueError and leave the current vocabulary in place. Frames being
        segmented while this runs keep the vocabulary they started with.
        """
        background = self.config.background_words if background_words is None else background_words
        vocab = self.build_vocabulary(entries, background, templates, progress)
        self.use_vocabulary(vocab, entries, background)
        return vocab.version

    def build_vocabulary(
        self,
        entries: Sequence[str],
        background_words: Sequence[str] | None = None,
        templates: str | None = None,
        progress: Progress | None = None,
    ) -> Vocabulary:
        """Encode a vocabulary with the next version number, without using it yet."""
        cfg = self.config
        background = cfg.background_words if background_words is None else list(background_words)
        templates = cfg.templates if templates is None else templates
        vocab = self._build_vocab(list(entries), background, templates, progress)
        # The method's per-vocabulary work happens here, with the encoding (the node builds in
        # the background and announces the map before use_vocabulary, which then finds it bound).
        self.method.bind_vocabulary(vocab)
        return vocab

    def use_vocabulary(
        self, vocab: Vocabulary, entries: Sequence[str], background_words: Sequence[str]
    ) -> None:
        """Swap in a vocabulary from build_vocabulary (frames started before keep theirs).

        `entries` and `background_words` are what it was built from, kept in the config as given.
        """
        # Outside the lock (the current method keeps serving frames); a cache hit when
        # build_vocabulary bound it for this method already.
        self.method.bind_vocabulary(vocab)
        with self._lock:
            self._vocab = vocab
            # The config of now, not of the build's start: a long build must not undo the
            # update()s made meanwhile (thresholds, sizes).
            self.config = dataclasses.replace(
                self.config,
                vocabulary=list(entries),
                background_words=list(background_words),
                templates=vocab.templates,
            )

    def set_method(self, name: str, params: dict[str, Any] | None = None) -> None:
        """Switch method (or its hyper-parameters); ValueError leaves the current one in place.

        The new method loads its auxiliary models (prepare) while the current one keeps serving;
        the old one is released once no frame uses it (ModelLoadError also keeps the current one).
        """
        method = create_method(name, params or {})
        self.check(self.config, method)
        method.prepare(self.backbone)
        method.bind_vocabulary(self._vocab)
        with self._lock:
            old, self.method = self.method, method
            self.config = dataclasses.replace(
                self.config, method=name, method_params=dict(params or {})
            )
            idle = id(old) not in self._in_flight
        if idle and old is not method:
            old.release()

    def update(self, **changes: Any) -> None:
        """Change inference/post-processing fields (thresholds, sizes, mode...) atomically."""
        fixed = {
            "model_name",
            "model_pretrained",
            "model_checkpoint",
            "model_cache_dir",
            "device",
            "precision",
            "quantize",
            "compile",
            "threads",
            "text_cache_dir",
            "method",
            "method_params",
            "vocabulary",
            "background_words",
            "templates",
        }
        bad = fixed & set(changes)
        if bad:
            raise ValueError(
                f"{sorted(bad)} cannot be changed with update(); use set_vocabulary / set_method "
                "or build a new Segmenter"
            )
        candidate = self.config.replace(**changes)
        self.check(candidate)
        with self._lock:
            self.config = self.config.replace(**changes)

    @contextlib.contextmanager
    def _frame(self) -> Iterator[tuple[SegmenterConfig, Method, Vocabulary]]:
        """Config, method and vocabulary of one consistent moment (a frame uses only these).

        A method swapped out by set_method while frames still use it is released after the last.
        """
        with self._lock:
            cfg, method, vocab = self.config, self.method, self._vocab
            self._in_flight[id(method)] = self._in_flight.get(id(method), 0) + 1
        try:
            yield cfg, method, vocab
        finally:
            with self._lock:
                left = self._in_flight.pop(id(method)) - 1
                if left:
                    self._in_flight[id(method)] = left
                retired = not left and method is not self.method
            if retired:
                method.release()

    def _forward(
        self, rgbs: list[np.ndarray], cfg: SegmenterConfig, method: Method, vocab: Vocabulary
    ) -> tuple[list[DenseMaps], torch.Tensor]:
        """The method's maps of same-size frames, and the resized images in [0, 1] (B, 3, H', W').

        A whole-image pass is resized to at most inference.MAX_TOKENS patches.
        """
        patch = method.token_patch(self.backbone) if cfg.mode == "whole" else 0
        uploads = [self._staging.upload(rgb, self.device) for rgb in rgbs]
        image = resize(
            uploads[0] if len(uploads) == 1 else torch.cat(uploads), cfg.short_side, patch
        )
        normed = self.backbone.normalize(image)
        maps = dense_maps_batch(
            method,
            self.backbone,
            normed,
            vocab,
            cfg.mode,
            cfg.crop,
            cfg.stride,
            cfg.max_batch,
            frame_sizes=[rgb.shape[:2] for rgb in rgbs],
        )
        return maps, image

    @torch.inference_mode()
    def dense_logits(self, rgb: np.ndarray) -> tuple[torch.Tensor, Vocabulary]:
        """Per-query logits (Q, H', W') at the model input, with the vocabulary they refer to.

        Q x H' x W' floats: for inspection and tests; segment() never holds them all at once.
        """
        with self._frame() as (cfg, method, vocab):
            return self._forward([as_rgb(rgb)], cfg, method, vocab)[0][0].at_input(), vocab

    @torch.inference_mode()
    def segment(self, rgb: np.ndarray) -> Result:
        """Label every pixel of an RGB image with a class id of the current vocabulary."""
        return self.segment_batch([rgb])[0]

    @torch.inference_mode()
    def segment_batch(self, images: Sequence[np.ndarray]) -> list[Result]:
        """segment() of several frames (cameras) with one vocabulary and shared ViT passes.

        Frames of the same size go through the model together (dense_maps_batch); frames of
        different sizes in separate passes. Each Result equals segment() of its frame alone,
        and all carry the same vocabulary. A Result's "model" timing is its pass's (shared by
        the frames of that pass, whose count is the "batch" timing).
        """
        rgbs = [as_rgb(image) for image in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, rgb in enumerate(rgbs):
            groups.setdefault(rgb.shape, []).append(i)
        results: list[Result | None] = [None] * len(rgbs)
        with self._frame() as (cfg, method, vocab):
            for indices in groups.values():
                group = [rgbs[i] for i in indices]
                done = self._segment_group(group, cfg, method, vocab)
                for i, result in zip(indices, done, strict=True):
                    results[i] = result
        return results  # type: ignore[return-value]

    def _segment_group(
        self, rgbs: list[np.ndarray], cfg: SegmenterConfig, method: Method, vocab: Vocabulary
    ) -> list[Result]:
        """Results of same-size frames from one forward pass (see segment_batch)."""
        t0 = time.perf_counter()
        # On a GPU the split is timed with CUDA events, not by waiting for the model: the host
        # queues the post-processing while the GPU still runs the network.
        events = (
            [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            if self.device.type == "cuda"
            else None
        )
        with collect_timings() as extra:
            if events:
                events[0].record()
            maps, images = self._forward(rgbs, cfg, method, vocab)
            if events:
                events[1].record()
            t1 = time.perf_counter()
            outputs = []
            for rgb, frame_maps, image in zip(rgbs, maps, images, strict=True):
                pixels = self._labels(frame_maps, image[None], cfg, rgb.shape[:2])
                outputs.append(self._download(pixels, vocab))
        t2 = time.perf_counter()
        # The download waited for the GPU, so both events have completed.
        model_ms = events[0].elapsed_time(events[1]) if events else (t1 - t0) * 1e3
        timings = {
            "model": model_ms,
            "postprocess": max(0.0, (t2 - t0) * 1e3 - model_ms),
            "total": (t2 - t0) * 1e3,
        }
        if len(rgbs) > 1:
            timings["batch"] = float(len(rgbs))
        timings.update({k: v for k, v in extra.items() if k not in timings})
        results = []
        for labels_np, conf_np, counts, sums in outputs:
            fractions, scores, counts = class_statistics(counts, sums, labels_np.size)
            results.append(
                Result(
                    labels=labels_np,
                    confidence=conf_np,
                    fractions=fractions,
                    scores=scores,
                    counts=counts,
                    vocabulary=vocab,
                    timings=dict(timings),
                )
            )
        return results

    @staticmethod
    def _labels(
        maps: DenseMaps, image: torch.Tensor, cfg: SegmenterConfig, size: tuple[int, int]
    ) -> PixelLabels:
        """Labels and confidence at the frame's size (labeling.py: chunked over the queries)."""
        pamr_image = upsample_to(image[0], size)[None] if cfg.refine == "pamr" else None
        return label_pixels(
            maps,
            size,
            prob_threshold=cfg.prob_threshold,
            area_threshold=cfg.area_threshold,
            pamr_image=pamr_image,
        )

    def _download(
        self, pixels: PixelLabels, vocab: Vocabulary
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Labels, confidence and per-class pixel counts / confidence sums, as numpy.

        The per-class statistics are reduced where the maps are (the GPU), and the label map is
        narrowed to uint8 there, so that the host receives 1 byte per pixel plus two short vectors
        instead of int32 maps to count over.
        """
        labels, confidence = pixels.labels, pixels.confidence
        n = vocab.num_classes
        flat = labels.flatten()
        # The unlabeled value (255 / 65535) lands in a bin past the classes, which is cut off.
        size = vocab.unlabeled + 1
        counts = torch.bincount(flat, minlength=size)[:n]
        sums = torch.bincount(flat, weights=confidence.flatten(), minlength=size)[:n]
        narrow = labels.to(torch.uint8) if n <= 255 else labels
        # float64: pixel counts of large frames stay exact (float32 stops at 2**24).
        stats = torch.stack([counts.double(), sums.double()]).cpu().numpy()
        labels_np = narrow.cpu().numpy()
        if n > 255:
            labels_np = labels_np.astype(np.uint16)
        return labels_np, confidence.cpu().numpy(), stats[0], stats[1]
