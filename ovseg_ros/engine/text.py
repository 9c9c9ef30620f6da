"""Text bank: vocabulary parsing, prompt templates, fast text encoding and its caches."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .templates import get_templates

log = logging.getLogger("ovseg_ros.engine")

#: Longest accepted class name or synonym, in characters (CLIP's context is 77 tokens).
MAX_NAME_CHARS = 100
#: Most classes in one vocabulary. Label ids must fit in uint16 below the unlabeled value 65535;
#: the limit keeps the class map messages (about 90 bytes a class) under a megabyte and the text
#: encoding of a change within hours on a CPU (minutes on a GPU) with the 80 templates.
MAX_CLASSES = 10_000
#: Most queries (class names, synonyms and background words together) in one vocabulary.
MAX_QUERIES = 20_000
#: Bytes of text embeddings kept in memory (least recently used dropped first); the disk cache
#: keeps everything. 64 MB hold about 32,000 ViT-B/16 embeddings (2 KB each).
MEMORY_CACHE_BYTES = 64 * 2**20
#: Prompts encoded per model call.
PROMPT_BATCH = 256

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class VocabClass:
    """One class of a vocabulary: its id, display name and the queries (synonyms) behind it."""

    id: int
    name: str
    synonyms: tuple[str, ...]


def _clean(text: str) -> str:
    """Collapse whitespace; names compare case-insensitively on this form."""
    return " ".join(str(text).split())


def excerpt(text: object, limit: int = 40) -> str:
    """repr() of a user-given string cut to about `limit` characters (error messages, logs)."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def parse_vocabulary(entries: Sequence[str]) -> tuple[VocabClass, ...]:
    """Validate vocabulary entries ('name; synonym; ...') and number the classes from 0."""
    if isinstance(entries, str):
        raise ValueError("vocabulary must be a list of class names, not one string")
    if not entries:
        raise ValueError("vocabulary is empty: give at least one class name")
    if len(entries) > MAX_CLASSES:
        raise ValueError(
            f"vocabulary has {len(entries)} classes; the limit is {MAX_CLASSES} (label ids are "
            "16-bit and every class is announced in the class map)"
        )
    classes: list[VocabClass] = []
    queries = 0
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise ValueError(f"vocabulary entry {i} is {type(entry).__name__}, not a string")
        parts = [_clean(p) for p in entry.split(";")]
        if not parts[0]:
            raise ValueError(f"vocabulary entry {i} ({excerpt(entry)}) has no class name")
        synonyms: list[str] = []
        for part in parts:
            if not part:
                raise ValueError(f"vocabulary entry {i} ({excerpt(entry)}) has an empty synonym")
            if len(part) > MAX_NAME_CHARS:
                raise ValueError(
                    f"vocabulary entry {i}: {excerpt(part, 30)} is longer than the limit of "
                    f"{MAX_NAME_CHARS} characters"
                )
            key = part.lower()
            if key in seen and seen[key] != i:
                raise ValueError(
                    f"duplicate name {excerpt(part)}: vocabulary entries {seen[key]} and {i} "
                    "both use it"
                )
            if key not in seen:
                seen[key] = i
                synonyms.append(part)
                queries += 1
                if queries > MAX_QUERIES:
                    raise ValueError(
                        f"vocabulary has more than {MAX_QUERIES} names and synonyms in all (the "
                        "limit); use fewer synonyms"
                    )
        classes.append(VocabClass(id=i, name=parts[0], synonyms=tuple(synonyms)))
    return tuple(classes)


def parse_background(words: Sequence[str], classes: Sequence[VocabClass]) -> tuple[str, ...]:
    """Clean background words; drop duplicates and words that are also vocabulary queries."""
    if isinstance(words, str):
        raise ValueError("background_words must be a list of words, not one string")
    taken = {s.lower() for c in classes for s in c.synonyms}
    if len(words) + len(taken) > MAX_QUERIES:
        raise ValueError(
            f"background_words has {len(words)} words; with the vocabulary's {len(taken)} names "
            f"that is over the limit of {MAX_QUERIES} queries"
        )
    out: list[str] = []
    for i, word in enumerate(words):
        if not isinstance(word, str):
            raise ValueError(f"background_words entry {i} is {type(word).__name__}, not a string")
        word = _clean(word)
        if not word:
            raise ValueError(f"background_words entry {i} is empty")
        if len(word) > MAX_NAME_CHARS:
            raise ValueError(f"background_words entry {i} is over {MAX_NAME_CHARS} characters")
        if word.lower() not in taken:
            taken.add(word.lower())
            out.append(word)
    return tuple(out)


@dataclass(frozen=True)
class Vocabulary:
    """An immutable, versioned class map with the text embeddings of all of its queries."""

    version: int
    classes: tuple[VocabClass, ...]
    background_words: tuple[str, ...]
    templates: str
    embeddings: torch.Tensor  # (Q, D) float32, L2-normalised: class synonyms, then background
    query_class: torch.Tensor  # (Q,) long: class id, or num_classes for a background word

    @property
    def num_classes(self) -> int:
        """Number of vocabulary classes (background words excluded)."""
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        """Class display names in id order."""
        return [c.name for c in self.classes]

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Queries per group in embedding-row order: each class's synonyms, then background."""
        sizes = tuple(len(c.synonyms) for c in self.classes)
        return sizes + ((len(self.background_words),) if self.background_words else ())

    @property
    def queries(self) -> list[str]:
        """Every encoded query, in embedding-row order."""
        return [s for c in self.classes for s in c.synonyms] + list(self.background_words)

    @property
    def unlabeled(self) -> int:
        """The label value of unlabeled pixels (255, or 65535 beyond 255 classes)."""
        return 255 if self.num_classes <= 255 else 65535

    def to_dict(self, colors: np.ndarray | None = None) -> dict[str, Any]:
        """JSON-ready class map: version, unlabeled value and classes with synonyms (and colour)."""
        classes = []
        for c in self.classes:
            item: dict[str, Any] = {"id": c.id, "name": c.name, "synonyms": list(c.synonyms)}
            if colors is not None:
                item["color"] = [int(v) for v in colors[c.id]]
            classes.append(item)
        return {
            "version": self.version,
            "unlabeled": self.unlabeled,
            "classes": classes,
            "background_words": list(self.background_words),
            "templates": self.templates,
        }


class TextEncoder:
    """Encodes queries with a template set; context cut to the longest prompt; two caches."""

    def __init__(
        self,
        model: nn.Module,
        model_name: str,
        device: torch.device,
        dtype: torch.dtype,
        cache_dir: Path | None,
    ) -> None:
        """Bind the text tower of an open_clip model; cache_dir None disables the disk cache."""
        import open_clip

        self.model = model
        self.device = device
        self.dtype = dtype
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.tower = self._text_tower(model)
        self.fingerprint = self._fingerprint(model_name)
        self.cache_dir = cache_dir / self.fingerprint if cache_dir is not None else None
        self._memory: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._memory_bytes = 0
        self.memory_limit = MEMORY_CACHE_BYTES
        self._lock = threading.Lock()
        self.model_calls = 0  # how many batches went through the text model (tests, benchmarks)

    @staticmethod
    def _text_tower(model: nn.Module) -> nn.Module | None:
        """The module holding a causal, argmax-pooled text transformer, or None if not plain."""
        tower = getattr(model, "text", model)
        pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
        parts = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if (
            pool != "argmax"
            or getattr(tower, "attn_mask", None) is None
            or not all(hasattr(tower, p) for p in parts)
            or getattr(tower, "cls_emb", None) is not None
            or getattr(tower, "use_pad_mask", False)
        ):
            return None
        return tower

    def _fingerprint(self, model_name: str) -> str:
        """Identify the text weights cheaply: name, dtype, activation and a few weight tensors.

        The activation matters: the same weights under GELU and QuickGELU give other embeddings.
        """
        digest = hashlib.sha1(f"{model_name}|{self.dtype}".encode())
        tower = getattr(self.model, "text", self.model)
        activations = sorted(
            {type(m).__name__ for m in tower.modules() if "gelu" in type(m).__name__.lower()}
        )
        digest.update("|".join(activations).encode())
        for attr in ("positional_embedding", "text_projection"):
            t = getattr(tower, attr, None)
            if isinstance(t, nn.Linear):
                t = t.weight
            if isinstance(t, torch.Tensor):
                digest.update(t.detach().float().cpu().numpy().tobytes())
        emb = getattr(tower, "token_embedding", None)
        if isinstance(emb, nn.Embedding):
            digest.update(emb.weight[:64].detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:20]

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (P, context) of prompts, on the model's device."""
        return self.tokenizer(list(prompts)).to(self.device)

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """L2-normalised embeddings of token ids; truncate cuts the context to the longest one."""
        self.model_calls += 1
        tower = self.tower
        if tower is None:
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        eot = tokens.argmax(dim=-1)
        length = int(eot.max()) + 1 if truncate else tokens.shape[1]
        tokens = tokens[:, :length]
        cast = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(tokens).to(cast) + tower.positional_embedding[:length].to(cast)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
        x = tower.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = tower.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)

    def _remember(self, key: tuple[str, str], emb: torch.Tensor) -> None:
        """Keep an embedding in memory, dropping the least recently used beyond memory_limit."""
        size = emb.numel() * emb.element_size()
        with self._lock:
            old = self._memory.pop(key, None)
            if old is not None:
                self._memory_bytes -= old.numel() * old.element_size()
            self._memory[key] = emb
            self._memory_bytes += size
            while self._memory_bytes > self.memory_limit and len(self._memory) > 1:
                _, dropped = self._memory.popitem(last=False)
                self._memory_bytes -= dropped.numel() * dropped.element_size()

    def _recall(self, key: tuple[str, str]) -> torch.Tensor | None:
        """An embedding from memory (marked as recently used), or None."""
        with self._lock:
            emb = self._memory.get(key)
            if emb is not None:
                self._memory.move_to_end(key)
            return emb

    @property
    def memory_bytes(self) -> int:
        """Bytes of embeddings held in memory now (at most memory_limit, or one embedding)."""
        return self._memory_bytes

    def _disk_path(self, templates: str, query: str) -> Path | None:
        """Where one query's embedding lives on disk (None when the disk cache is off)."""
        if self.cache_dir is None:
            return None
        name = hashlib.sha1(query.encode()).hexdigest()[:24]
        return self.cache_dir / templates / f"{name}.npy"

    def _load_disk(self, templates: str, query: str) -> torch.Tensor | None:
        """A cached embedding from disk, or None."""
        path = self._disk_path(templates, query)
        if path is None or not path.is_file():
            return None
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable text cache file %s (%s)", path, exc)
            return None

    def _store_disk(self, templates: str, query: str, emb: torch.Tensor) -> None:
        """Write an embedding atomically; a read-only cache only logs a warning."""
        path = self._disk_path(templates, query)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, emb.numpy(), allow_pickle=False)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write the text cache in %s (%s); set text.cache_dir", path, exc)

    def encode(
        self, queries: Sequence[str], templates: str, progress: Progress | None = None
    ) -> torch.Tensor:
        """(Q, D) float32 embeddings: template prompts averaged and re-normalised, cached."""
        tpl = get_templates(templates)
        result: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for q in dict.fromkeys(queries):
            emb = self._recall((templates, q))
            if emb is None:
                emb = self._load_disk(templates, q)
                if emb is not None:
                    self._remember((templates, q), emb)
            if emb is None:
                missing.append(q)
            else:
                result[q] = emb
        if missing:
            prompts = [t.format(q) for q in missing for t in tpl]
            outs = []
            for start in range(0, len(prompts), PROMPT_BATCH):
                batch = prompts[start : start + PROMPT_BATCH]
                outs.append(self.encode_tokens(self.tokenize(batch)).cpu())
                if progress is not None:
                    progress(min(start + PROMPT_BATCH, len(prompts)), len(prompts))
            per_prompt = torch.cat(outs).view(len(missing), len(tpl), -1)
            embs = F.normalize(per_prompt.mean(dim=1), dim=-1)
            for q, emb in zip(missing, embs, strict=True):
                emb = emb.clone()
                self._remember((templates, q), emb)
                self._store_disk(templates, q, emb)
                result[q] = emb
        return torch.stack([result[q] for q in queries]).to(self.device)


def build_vocabulary(
    encoder: TextEncoder,
    version: int,
    entries: Sequence[str],
    background_words: Sequence[str],
    templates: str,
    progress: Progress | None = None,
) -> Vocabulary:
    """Parse, validate and encode a vocabulary into an immutable Vocabulary."""
    get_templates(templates)
    classes = parse_vocabulary(entries)
    background = parse_background(background_words, classes)
    queries = [s for c in classes for s in c.synonyms] + list(background)
    owner = [c.id for c in classes for _ in c.synonyms] + [len(classes)] * len(background)
    embeddings = encoder.encode(queries, templates, progress)
    return Vocabulary(
        version=version,
        classes=classes,
        background_words=background,
        templates=templates,
        embeddings=embeddings,
        query_class=torch.tensor(owner, dtype=torch.long, device=embeddings.device),
    )
