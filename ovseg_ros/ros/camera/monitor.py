"""What the sample camera makes of the node's outputs: statistics, printed lines, overlay files.

``parse_vocabulary_json`` reads a ``~/vocabulary`` message into a ``VocabularyMap``; ``Stats``
keeps the window counters, latency percentiles and class shares and formats the line printed
once per second (pure Python, no rclpy); ``OverlayWriter`` saves received overlays as PNG files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..classmap import ClassMapHistory, stamp_from_dict
from .sources import SourceError

__all__ = ["OverlayWriter", "Stats", "VocabularyMap", "parse_vocabulary_json", "percentile"]


@dataclass(frozen=True)
class VocabularyMap:
    """The class map of one ``~/vocabulary`` message."""

    version: Any
    unlabeled: int | None
    names: dict[int, str]
    stamp: int = 0  # ns: label images stamped from here on use this map (the node's rule)


def parse_vocabulary_json(text: str) -> VocabularyMap:
    """Parse the node's vocabulary JSON; ValueError says what is wrong with it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"vocabulary is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("vocabulary JSON is not an object")
    classes = data.get("classes")
    if not isinstance(classes, list):
        raise ValueError("vocabulary JSON has no 'classes' list")
    names: dict[int, str] = {}
    for entry in classes:
        if not isinstance(entry, dict):
            raise ValueError(f"vocabulary class entry is not an object: {entry!r}")
        class_id = entry.get("id")
        if not isinstance(class_id, int) or isinstance(class_id, bool):
            raise ValueError(f"vocabulary class has no integer 'id': {entry!r}")
        names[class_id] = str(entry.get("name", f"#{class_id}"))
    unlabeled = data.get("unlabeled")
    if not isinstance(unlabeled, int) or isinstance(unlabeled, bool):
        unlabeled = None
    return VocabularyMap(
        version=data.get("version"),
        unlabeled=unlabeled,
        names=names,
        stamp=stamp_from_dict(data.get("stamp")),
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100, linear interpolation between closest ranks)."""
    if not values:
        raise ValueError("percentile of no values")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _percent(share: float) -> str:
    if 0.0 < share < 0.005:
        return "<1%"
    return f"{share * 100:.0f}%"


class Stats:
    """Counters of the monitor and the lines it prints; pure Python, no rclpy.

    Times are seconds of any monotonic clock, given by the caller. ``report(now)`` formats the
    window since the previous report (or since ``start``) and opens a new one; ``summary()``
    covers the whole run.
    """

    def __init__(self, labels_topic: str = "/ovseg/labels", *, start: float = 0.0, top: int = 6):
        self.labels_topic = labels_topic
        self.top = top
        self.published = 0
        self.outputs = 0
        self.overlays = 0
        self.saved = 0
        self.foreign = 0
        self.latency_count = 0
        self.latency_sum = 0.0
        self.latency_max: float | None = None
        self.last_output_time: float | None = None
        self.last_labels: np.ndarray | None = None
        self.vocabulary: VocabularyMap | None = None  # the newest class map
        self.history = ClassMapHistory()  # the last class maps, to pair label images by stamp
        self.last_map: VocabularyMap | None = None  # the class map of last_labels
        self.vocabulary_error: str | None = None
        self._window_start = start
        self._window_published = 0
        self._window_outputs = 0
        self._window_latencies: list[float] = []

    # --- events ----------------------------------------------------------------------------

    def frame_published(self) -> None:
        self.published += 1
        self._window_published += 1

    def output_received(
        self,
        now: float,
        latency_s: float | None,
        labels: np.ndarray | None = None,
        *,
        ours: bool = True,
        stamp_ns: int | None = None,
    ) -> None:
        """One label image arrived; ``latency_s`` None when its stamp is unusable, ``ours``
        False when it was computed from a frame another publisher sent. With its stamp, the
        class map it uses is picked by the node's pairing rule (classmap.ClassMapHistory)."""
        self.outputs += 1
        self.foreign += int(not ours)
        self._window_outputs += 1
        self.last_output_time = now
        if latency_s is not None:
            self.latency_count += 1
            self.latency_sum += latency_s
            self.latency_max = (
                latency_s if self.latency_max is None else max(self.latency_max, latency_s)
            )
            self._window_latencies.append(latency_s)
        if labels is not None:
            self.last_labels = labels
            self.last_map = (
                self.history.lookup(stamp_ns) if stamp_ns is not None else self.vocabulary
            )

    def overlay_received(self, saved: bool = False) -> None:
        self.overlays += 1
        self.saved += int(saved)

    def vocabulary_received(self, text: str) -> str | None:
        """Take a vocabulary JSON; return the error (and keep the previous map) when invalid."""
        try:
            self.vocabulary = parse_vocabulary_json(text)
        except ValueError as exc:
            self.vocabulary_error = str(exc)
            return self.vocabulary_error
        self.vocabulary_error = None
        version = self.vocabulary.version
        self.history.add(
            self.vocabulary.stamp, version if isinstance(version, int) else 0, self.vocabulary
        )
        return None

    # --- derived values --------------------------------------------------------------------

    @property
    def mean_latency(self) -> float | None:
        return self.latency_sum / self.latency_count if self.latency_count else None

    def class_shares(self) -> tuple[list[tuple[str, float]], float]:
        """(name, pixel share) of each class in the last labels, largest first; and the
        unlabeled share. Ids missing from the vocabulary appear as ``id N (unknown)``."""
        labels = self.last_labels
        if labels is None or labels.size == 0:
            return [], 0.0
        vocab = self.last_map if self.last_map is not None else self.vocabulary
        unlabeled = vocab.unlabeled if vocab is not None else None
        if unlabeled is None:
            unlabeled = 65535 if labels.dtype == np.uint16 else 255
        counts = np.bincount(labels.reshape(-1).astype(np.int64, copy=False))
        total = float(labels.size)
        shares: list[tuple[str, float]] = []
        unlabeled_share = 0.0
        for class_id in np.flatnonzero(counts):
            share = counts[class_id] / total
            class_id = int(class_id)
            if class_id == unlabeled:
                unlabeled_share = share
            elif vocab is not None and class_id in vocab.names:
                shares.append((vocab.names[class_id], share))
            else:
                shares.append((f"id {class_id} (unknown)", share))
        shares.sort(key=lambda item: -item[1])
        return shares, unlabeled_share

    def format_classes(self) -> str:
        shares, unlabeled = self.class_shares()
        if not shares and unlabeled == 0.0:
            return "no labels decoded"
        parts = [f"{name} {_percent(share)}" for name, share in shares[: self.top]]
        if len(shares) > self.top:
            parts.append(f"+{len(shares) - self.top} more")
        if not shares:
            parts.append("no class")
        if unlabeled > 0.0:
            parts.append(f"unlabeled {_percent(unlabeled)}")
        return ", ".join(parts)

    def format_vocabulary(self) -> str:
        if self.vocabulary_error is not None:
            return "vocab invalid"
        if self.vocabulary is None:
            return "no vocab yet"
        version = self.vocabulary.version
        return "vocab v?" if version is None else f"vocab v{version}"

    # --- lines -----------------------------------------------------------------------------

    def report(self, now: float, detail: str = "") -> str:
        """The one-line report of the window since the last report; opens a new window."""
        elapsed = max(now - self._window_start, 1e-9)
        in_fps = self._window_published / elapsed
        out_fps = self._window_outputs / elapsed
        latencies = self._window_latencies
        self._window_start = now
        self._window_published = 0
        self._window_outputs = 0
        self._window_latencies = []
        if self.outputs == 0:
            line = f"waiting for {self.labels_topic} ... | in {in_fps:.1f} fps"
            line += f" ({self.published} published)"
            return f"{line} | {detail}" if detail else line
        if latencies:
            p50 = percentile(latencies, 50) * 1000.0
            worst = max(latencies) * 1000.0
            latency = f"latency {p50:.0f} ms (max {worst:.0f})"
        elif self.last_output_time is not None and out_fps == 0.0:
            latency = f"latency - (last output {now - self.last_output_time:.1f} s ago)"
        else:
            latency = "latency -"
        parts = [
            f"in {in_fps:.1f} fps",
            f"out {out_fps:.1f} fps",
            latency,
            self.format_vocabulary(),
            self.format_classes(),
        ]
        if detail:
            parts.append(detail)
        return " | ".join(parts)

    def summary(self) -> str:
        """The final line: frames published, outputs received, latency over the whole run."""
        text = f"published {self.published} frames, received {self.outputs} outputs"
        if self.outputs == 0:
            return f"{text} (nothing arrived on {self.labels_topic})"
        extra = f"{self.overlays} overlays"
        if self.saved:
            extra += f", {self.saved} saved"
        if self.foreign:
            extra += f", {self.foreign} for frames of another publisher"
        text += f" ({extra})"
        mean = self.mean_latency
        if mean is not None and self.latency_max is not None:
            text += f", latency mean {mean * 1000:.0f} ms (max {self.latency_max * 1000:.0f})"
        return text


# --- overlay files -------------------------------------------------------------------------


class OverlayWriter:
    """Writes overlay frames as ``overlay_NNNNNN.png`` (every ``every``-th, the first included)
    and always refreshes ``latest_overlay.png`` (replaced atomically)."""

    LATEST = "latest_overlay.png"

    def __init__(self, out_dir: str | Path, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"save-every must be at least 1, got {every}")
        self.out_dir = Path(out_dir)
        self.every = every
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SourceError(
                f"cannot create output folder '{out_dir}': {exc.strerror or exc}"
            ) from exc
        if not os.access(self.out_dir, os.W_OK):
            raise SourceError(f"output folder '{out_dir}' is not writable")

    def write(self, index: int, rgb: np.ndarray) -> Path | None:
        """Write overlay number ``index`` (1-based); the path when it was kept, else None.

        Raises OSError when a file cannot be written.
        """
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        kept = None
        if (index - 1) % self.every == 0:
            kept = self.out_dir / f"overlay_{index:06d}.png"
            self._imwrite(kept, bgr)
        tmp = self.out_dir / ".latest_overlay.tmp.png"
        self._imwrite(tmp, bgr)
        os.replace(tmp, self.out_dir / self.LATEST)
        return kept

    @staticmethod
    def _imwrite(path: Path, bgr: np.ndarray) -> None:
        try:
            ok = cv2.imwrite(str(path), bgr)
        except cv2.error as exc:
            raise OSError(f"cannot write '{path}': {str(exc).strip()}") from exc
        if not ok:
            raise OSError(f"cannot write '{path}'")
