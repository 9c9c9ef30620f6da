"""CLIP-RC (Zhang et al., CVPR 2024): a trained zero-shot segmenter, from its released checkpoints.

METHODS.md section 6. Unlike the other methods CLIP-RC is trained (on the seen classes of PASCAL
VOC or COCO-Stuff): its own network (engine/cliprc_net.py: CLIP ViT-B/16 at 512 px with deep
visual prompts and region-level bridge tokens, an ATM-style decode head, CLIP's text encoder)
comes from a checkpoint file (engine/cliprc_checkpoint.py), loaded in prepare() and freed in
release(); the engine's open_clip backbone only provides the colour normalisation it undoes.

Per crop (or whole image), the official test path (models/segmentor/clip_rc.py, decode_seg.py):

1. The CLIP-normalised input is turned back into RGB and normalised as the configs do (ImageNet
   mean/std); the network gives per-query mask logits on the patch grid (logits()).
2. Upsampled bilinearly to the crop (the engine, as the official resize to 512 then to the crop),
   the scores are sigmoid(logit) - w for the training classes, w the calibration (0.1 inductive,
   0 transductive and fully supervised; cliprc_checkpoint.CALIBRATION), in pixel_logits().
3. Overlapping crops are averaged and resized to the frame (the engine's slide mode); the label
   is the argmax over the queries.

Labels through the engine: its labelling takes a softmax over the queries, then the argmax and
the confidence. pixel_logits returns logit_scale * (calibrated score), whose argmax is the
official one (a positive factor keeps the order); logit_scale (10) only sets how peaked the
confidence is, which prob_threshold compares with. Synonyms (max over a class's queries) and
background words work as for the other methods: every query is a text token of the decode head.
Note that the decode head's patch tokens attend to all queries, so a class's score depends a
little on the rest of the vocabulary (the method's design).

Vocabulary at run time: each query is encoded by the checkpoint's (frozen CLIP) text encoder with
the authors' template set (VOC: "a photo of a {}", COCO-Stuff: 15 templates; parameter
templates), averaged and normalised, cached in memory per vocabulary (engine/text.py's
TextEncoder). A query is a training class, and calibrated, when a synonym of its class matches a
name of the setting's training classes ignoring case, spaces and punctuation ("dining table" =
"diningtable"); training_classes overrides the list.

Published protocol (configs test_cfg): short side 512 (long side at most 2048), slide with crop
512 and stride 426. The engine's input.short_side, inference.mode / crop / stride are global
settings: `--short-side 512 --mode slide --crop 512 --stride 426` (node: input.short_side 512,
inference.mode slide, inference.crop 512, inference.stride 426); `ovseg eval --method cliprc`
applies them. Other sizes run the network on their own grid (positions resized bilinearly, bridge
regions split evenly), which the authors did not test.
"""

from __future__ import annotations

import gc
import logging
import math
import re
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..backbone import Backbone
from ..clip_weights import ModelLoadError
from ..cliprc_checkpoint import (
    CALIBRATION,
    DATASET_TEMPLATES,
    DOWNLOAD,
    SETTINGS,
    Setting,
    detect_setting,
    load_network,
    random_network,
)
from ..cliprc_net import CLIPRCNet, calibrated_scores
from ..templates import TEMPLATE_SETS
from ..text import TextEncoder, Vocabulary
from .base import Method, MethodParams, register

log = logging.getLogger("ovseg_ros.engine")

#: The configs' img_norm_cfg (mean 123.675, 116.28, 103.53; std 58.395, 57.12, 57.375 on 0..255).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: open_clip tokenizer of CLIP's text encoder (the BPE vocabulary every CLIP-RC model uses).
TOKENIZER = "ViT-B-16"


@dataclass
class CLIPRCParams(MethodParams):
    """CLIP-RC's parameters: the checkpoint, its setting, the calibration, the text templates.

    Published protocol: short side 512, slide crop 512 stride 426 (global settings, module
    docstring). Cost: ViT-B/16 on 1,051 tokens per 512 x 512 crop plus the decode head, two crops
    for a 640 x 480 frame; use a GPU on a robot.
    """

    logit_scale: float = 10.0  # confidence = softmax over queries of this * score; labels unchanged
    checkpoint: str = ""  # released CLIP-RC .pth file; 'none' = random network (smoke tests only)
    setting: str = "auto"  # auto (read from the file), or e.g. voc_inductive, coco_stuff_fully
    calibration: float = -1.0  # subtracted from training classes' scores; < 0: the setting's
    training_classes: str = "auto"  # auto (the setting's), none, or comma-separated class names
    templates: str = "auto"  # auto (VOC cliprc_single, COCO-Stuff cliprc_multi) or a template set

    def check(self) -> None:
        """Known setting and template set; finite calibration; positive logit_scale."""
        if self.setting != "auto" and self.setting not in SETTINGS:
            raise ValueError(
                f"cliprc setting must be auto or one of {list(SETTINGS)}, got {self.setting!r}"
            )
        if self.templates != "auto" and self.templates not in TEMPLATE_SETS:
            raise ValueError(
                f"cliprc templates must be auto or one of {sorted(TEMPLATE_SETS)}, got "
                f"{self.templates!r}"
            )
        if not math.isfinite(self.calibration):
            raise ValueError(f"cliprc calibration must be a number, got {self.calibration}")
        if not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ValueError(f"cliprc logit_scale must be positive, got {self.logit_scale}")


def name_key(name: str) -> str:
    """A class name to compare ignoring case, spaces and punctuation ('Dining table')."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def seen_queries(vocab: Vocabulary, training: tuple[str, ...]) -> torch.Tensor:
    """(Q,) bool: queries of a class one of whose synonyms is a training class, and background
    words that are one."""
    keys = {name_key(n) for n in training}
    seen: list[bool] = []
    for c in vocab.classes:
        hit = any(name_key(s) in keys for s in (c.name, *c.synonyms))
        seen += [hit] * len(c.synonyms)
    seen += [name_key(w) in keys for w in vocab.background_words]
    return torch.tensor(seen, dtype=torch.bool)


class LoadedCLIPRC:
    """A CLIP-RC network on a device, its text encoder with a memory cache, and its file's meta."""

    def __init__(
        self, net: CLIPRCNet, meta: dict, source: str, device: torch.device, dtype: torch.dtype
    ) -> None:
        """Move the network (image encoder in dtype, text and head in float32) to device."""
        net.eval().requires_grad_(False)
        net.to(device)
        net.backbone.to(dtype)
        self.net = net
        self.meta = meta
        self.source = source
        self.device = device
        self.dtype = dtype
        self.patch = net.arch.patch
        self.text = TextEncoder(net.text_encoder, TOKENIZER, device, torch.float32, None)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)


#: Loaded networks by (file identity or 'random', device, dtype), held only by the methods using
#: them: a parameter change (a new CLIPRC instance) reuses the network; freed with its last user.
_SHARED: weakref.WeakValueDictionary[tuple, LoadedCLIPRC] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def _random_backbone(backbone: Backbone) -> bool:
    """Whether the engine runs on random CLIP weights (model.pretrained none)."""
    return str(getattr(backbone, "source", "")).startswith("random weights")


@register
class CLIPRC(Method):
    """CLIP-RC from a released checkpoint: its own network, sigmoid scores, calibration."""

    name = "cliprc"
    summary = (
        "trained zero-shot CLIP-RC (CVPR 2024) from a released checkpoint (method_params "
        "checkpoint): VPT + region-level bridges + ATM decoder, calibrated sigmoid scores"
    )
    Params: ClassVar[type[MethodParams]] = CLIPRCParams
    has_pixel_step: ClassVar[bool] = True

    def __init__(self, params: MethodParams) -> None:
        """Keep params; the network is loaded by prepare() (or on first use)."""
        super().__init__(params)
        self._loaded: LoadedCLIPRC | None = None
        self._key: tuple | None = None
        self._setting: Setting | None = None
        self._lock = threading.Lock()
        self._texts: list[tuple[tuple, torch.Tensor, torch.Tensor]] = []
        self._text_lock = threading.Lock()

    # --- lifecycle --------------------------------------------------------------------------

    def _source(self, backbone: Backbone) -> tuple[str, tuple]:
        """'random' or the checkpoint path, and the key that identifies the loaded network."""
        p: CLIPRCParams = self.params  # type: ignore[assignment]
        choice = p.checkpoint.strip()
        device = (str(backbone.device), backbone.dtype)
        if choice.lower() == "none" or (not choice and _random_backbone(backbone)):
            dataset = "voc" if p.setting == "auto" else p.setting.rsplit("_", 1)[0]
            return "random", ("random", dataset, *device)
        if not choice:
            raise ModelLoadError(f"method cliprc needs a trained CLIP-RC checkpoint: {DOWNLOAD}")
        path = Path(choice).expanduser()
        try:
            stat = path.stat()
            identity: tuple = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        except OSError:
            identity = (str(path),)
        return choice, (*identity, *device)

    def _load(self, source: str, key: tuple, backbone: Backbone) -> LoadedCLIPRC:
        """Build or reuse the network for a source on the backbone's device and dtype."""
        with _SHARED_LOCK:
            loaded = _SHARED.get(key)
            if loaded is not None:
                return loaded
            if source == "random":
                log.warning(
                    "cliprc runs a RANDOM CLIP-RC network (no checkpoint: method_params.cliprc."
                    "checkpoint is '%s' with model.pretrained none); its segmentations are "
                    "meaningless (use this for smoke tests only)",
                    self.params.checkpoint,  # type: ignore[attr-defined]
                )
                net, meta, what = random_network(key[1]), {}, "random weights (seed 0)"
            else:
                net, meta = load_network(source)
                what = f"checkpoint {Path(source).name}"
            loaded = LoadedCLIPRC(net, meta, what, backbone.device, backbone.dtype)
            _SHARED[key] = loaded
            return loaded

    def network(self, backbone: Backbone) -> LoadedCLIPRC:
        """The loaded network for the backbone's device and dtype (ModelLoadError if it cannot)."""
        source, key = self._source(backbone)
        with self._lock:
            if self._loaded is None or self._key != key:
                self._loaded = None
                loaded = self._load(source, key, backbone)
                p: CLIPRCParams = self.params  # type: ignore[assignment]
                path = "" if source == "random" else source
                setting = detect_setting(loaded.meta, path, loaded.net.arch, p.setting)
                self._loaded, self._key, self._setting = loaded, key, setting
                with self._text_lock:
                    self._texts = []
                log.info(
                    "cliprc: %s on %s/%s, setting %s (%s), %d training classes, calibration %.2f",
                    loaded.source,
                    backbone.device,
                    backbone.dtype,
                    setting.name,
                    setting.source,
                    len(self.training_classes()),
                    self.calibration(),
                )
            return self._loaded

    def prepare(self, backbone: Backbone) -> None:
        """Load the network on the backbone's device and dtype (ModelLoadError if it fails)."""
        self.network(backbone)

    def release(self) -> None:
        """Drop this method's hold on the network (freed when no other method holds it)."""
        with self._lock:
            loaded, self._loaded, self._key = self._loaded, None, None
        with self._text_lock:
            self._texts = []
        if loaded is not None:
            on_cuda = loaded.device.type == "cuda"
            del loaded
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()

    @property
    def loaded(self) -> bool:
        """Whether the network is in memory."""
        return self._loaded is not None

    @property
    def setting(self) -> Setting | None:
        """The loaded checkpoint's setting (None before prepare)."""
        return self._setting

    def token_patch(self, backbone: Backbone) -> int:
        """The network's patch (16 for every released checkpoint)."""
        return self._loaded.patch if self._loaded is not None else backbone.patch_size

    # --- vocabulary -------------------------------------------------------------------------

    def training_classes(self) -> tuple[str, ...]:
        """Names whose queries are calibrated: the parameter's, or the setting's seen classes."""
        p: CLIPRCParams = self.params  # type: ignore[assignment]
        choice = p.training_classes.strip()
        if choice.lower() == "none":
            return ()
        if choice and choice.lower() != "auto":
            return tuple(n.strip() for n in choice.split(",") if n.strip())
        return self._setting.training if self._setting is not None else ()

    def calibration(self) -> float:
        """The weight subtracted from training classes' scores."""
        p: CLIPRCParams = self.params  # type: ignore[assignment]
        if p.calibration >= 0:
            return p.calibration
        return CALIBRATION[self._setting.mode] if self._setting is not None else 0.0

    def templates(self) -> str:
        """The template set the text is encoded with."""
        p: CLIPRCParams = self.params  # type: ignore[assignment]
        if p.templates != "auto":
            return p.templates
        dataset = self._setting.dataset if self._setting is not None else "voc"
        return DATASET_TEMPLATES[dataset]

    def text_for(self, vocab: Vocabulary) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, E) text embeddings of vocab's queries and their (Q,) training-class mask."""
        loaded = self._loaded
        if loaded is None:
            raise RuntimeError("cliprc: the network is not loaded (call prepare first)")
        key = (tuple(vocab.queries), vocab.background_words, self.templates(), id(loaded))
        with self._text_lock:
            for known, emb, seen in self._texts:
                if known == key:
                    return emb, seen
        emb = loaded.text.encode(vocab.queries, self.templates())
        seen = seen_queries(vocab, self.training_classes()).to(loaded.device)
        with self._text_lock:
            # The last two: a frame started with the previous vocabulary still finds its own.
            self._texts = [(key, emb, seen), *self._texts[:1]]
        return emb, seen

    def bind_vocabulary(self, vocab: Vocabulary) -> None:
        """Encode the queries with the checkpoint's text encoder once per vocabulary."""
        if self._loaded is not None:
            self.text_for(vocab)

    # --- per frame --------------------------------------------------------------------------

    def to_input(self, images: torch.Tensor, backbone: Backbone, loaded: LoadedCLIPRC):
        """CLIP-normalised images -> RGB -> the configs' ImageNet normalisation, network dtype."""
        rgb = images.float() * backbone.std + backbone.mean
        return ((rgb - loaded.mean) / loaded.std).to(loaded.dtype)

    @torch.inference_mode()
    def logits(self, backbone: Backbone, images: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """(B, Q, h, w) mask logits (before the sigmoid) on the network's patch grid."""
        loaded = self.network(backbone)
        emb, _ = self.text_for(vocab)
        x = self.to_input(images, backbone, loaded)
        height, width = x.shape[-2:]
        ph, pw = (-height) % loaded.patch, (-width) % loaded.patch
        if ph or pw:  # a backbone of another patch size padded for its own
            x = F.pad(x, (0, pw, 0, ph))
        start = time.perf_counter()
        out = loaded.net(x, emb)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        self.record_timing("cliprc", (time.perf_counter() - start) * 1e3)
        if ph or pw:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
            out = out[..., :height, :width]
        return out

    def pixel_logits(
        self, up: torch.Tensor, grid: torch.Tensor, queries: slice, vocab: Vocabulary
    ) -> torch.Tensor:
        """logit_scale * (sigmoid(up) - calibration on training classes) (module docstring)."""
        _, seen = self.text_for(vocab)
        scores = calibrated_scores(up, seen[queries], self.calibration())
        return scores.mul_(self.params.logit_scale)
