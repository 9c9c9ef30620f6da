"""Text encoding timings: cold (full context), truncated context, disk and memory cache."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..engine import Segmenter
from ..engine.templates import get_templates
from ..engine.text import TextEncoder, build_vocabulary

#: A 20-class vocabulary (the PASCAL VOC classes) for text-encoding timings.
VOC20: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dining table",
    "dog",
    "horse",
    "motorbike",
    "person",
    "potted plant",
    "sheep",
    "sofa",
    "train",
    "tv monitor",
)


def bench_text(
    segmenter: Segmenter, templates: str = "imagenet80", classes: Sequence[str] = VOC20
) -> dict[str, Any]:
    """Seconds to encode `classes` x `templates` through TextEncoder / build_vocabulary.

    cold: a fresh encoder without cache, the full 77-token context (encode_tokens with
    truncate=False); truncated: a fresh encoder without cache, the context cut to the longest
    prompt (the engine's path); cached_disk: a second fresh encoder reading what a first one
    wrote to a temporary disk cache; cached_memory: that encoder again (its memory cache).
    """
    backbone, name = segmenter.backbone, segmenter.config.model_name

    def encoder(cache: Path | None) -> TextEncoder:
        return TextEncoder(backbone.model, name, backbone.device, backbone.dtype, cache)

    def build(enc: TextEncoder) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        vocab = build_vocabulary(enc, 0, list(classes), [], templates)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize(backbone.device)
        return time.perf_counter() - start, vocab.embeddings

    cold_enc = encoder(None)

    def full_context(tokens: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        return TextEncoder.encode_tokens(cold_enc, tokens, truncate=False)

    cold_enc.encode_tokens = full_context  # type: ignore[method-assign]
    cold_s, cold_emb = build(cold_enc)
    truncated_s, short_emb = build(encoder(None))
    with tempfile.TemporaryDirectory(prefix="ovseg_bench_text_") as tmp:
        first_s, _ = build(encoder(Path(tmp)))
        reader = encoder(Path(tmp))
        calls = reader.model_calls
        disk_s, _ = build(reader)
        memory_s, _ = build(reader)
        from_disk = reader.model_calls == calls
    prompts = [t.format(c) for c in classes for t in get_templates(templates)]
    context = int(cold_enc.tokenize(prompts).argmax(dim=-1).max()) + 1
    return {
        "classes": len(classes),
        "templates": templates,
        "prompts": len(prompts),
        "context": context,
        "cold_s": cold_s,
        "truncated_s": truncated_s,
        "first_with_cache_s": first_s,
        "cached_disk_s": disk_s,
        "cached_memory_s": memory_s,
        "cache_hit_without_model": from_disk,
        "speedup_truncated": cold_s / truncated_s if truncated_s > 0 else float("inf"),
        "max_abs_diff_truncated": float((cold_emb - short_emb).abs().max()),
    }
