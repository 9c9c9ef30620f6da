"""Counters and health rules behind the node's /diagnostics status (no rclpy here).

Rejected frames are counted by kind (decode.ImageDecodeError.kind and the node's own kinds), a
closed set, so the counters are complete and bounded whatever arrives. The status level says what
is true now: WARN while frames were rejected in the last WINDOW seconds, while a QoS mismatch is
present in the ROS graph, or for a while after a requested change failed and was undone; ERROR
while frames fail inside the model. Text that comes from users (class names, reasons) is cut to a
bounded length.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Seconds during which a rejection or a model failure keeps the status at WARN / ERROR.
WINDOW = 10.0
#: Seconds a failed (and undone) vocabulary or method change stays a WARN.
CHANGE_FAILURE_SECONDS = 60.0
#: Seconds between two log lines about rejected frames of the same kind.
REJECT_LOG_PERIOD = 5.0
#: Samples kept for the latency / inference-time percentiles.
STATS_WINDOW = 200
#: Longest text of user origin (class names, reasons) in a diagnostics value or message.
MAX_TEXT = 200


def shorten(text: str, limit: int = MAX_TEXT) -> str:
    """text cut to `limit` characters, with how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def names_summary(names: Sequence[str], limit: int = MAX_TEXT) -> str:
    """The first class names that fit in `limit` characters, then how many more there are."""
    out: list[str] = []
    used = 0
    for name in names:
        piece = shorten(name, 40)
        if out and used + len(piece) + 2 > limit:
            break
        out.append(piece)
        used += len(piece) + 2
    rest = len(names) - len(out)
    return ", ".join(out) + (f" ... and {rest} more ({len(names)} classes)" if rest else "")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of values; NaN when empty."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class CameraCounters:
    """What happened to one camera's frames beyond the slot's counters."""

    rejected: Counter = field(default_factory=Counter)  # kind -> count
    last_rejection: str = ""  # the newest rejection's reason (shortened)
    last_rejected_at: float = -math.inf  # time.monotonic()
    skipped_idle: int = 0  # not segmented: no output had a subscriber
    older_map: int = 0  # discarded: labelled with a class map older than the one announced
    before_map: int = 0  # discarded: stamped before the class map it was labelled with
    published: int = 0
    failed_seen: int = 0  # the slot's failure count at the last report
    last_failed_at: float = -math.inf
    _logged: dict[str, float] = field(default_factory=dict)

    def reject(self, kind: str, reason: str, now: float | None = None) -> bool:
        """Count a rejected frame; True when it should be logged (first of its kind in a while)."""
        now = time.monotonic() if now is None else now
        self.rejected[kind] += 1
        self.last_rejection = shorten(reason)
        self.last_rejected_at = now
        if now - self._logged.get(kind, -math.inf) >= REJECT_LOG_PERIOD:
            self._logged[kind] = now
            return True
        return False

    def failures(self, failed: int, now: float | None = None) -> None:
        """Note the slot's failure counter (a model exception per frame)."""
        now = time.monotonic() if now is None else now
        if failed != self.failed_seen:
            self.failed_seen = failed
            self.last_failed_at = now


class LatencyWindow:
    """Samples of the last frames: latency and inference time percentiles (thread-safe)."""

    def __init__(self) -> None:
        """Empty windows of STATS_WINDOW samples."""
        self._lock = threading.Lock()
        self.latency_ms: deque[float] = deque(maxlen=STATS_WINDOW)
        self.inference_ms: deque[float] = deque(maxlen=STATS_WINDOW)

    def add(self, latency_ms: float, inference_ms: float) -> None:
        """Add one frame's figures."""
        with self._lock:
            self.latency_ms.append(latency_ms)
            self.inference_ms.append(inference_ms)

    def snapshot(self) -> tuple[list[float], list[float]]:
        """Copies of both windows."""
        with self._lock:
            return list(self.latency_ms), list(self.inference_ms)


def incompatibility(
    pub_reliable: bool, pub_durable: bool, sub_reliable: bool, sub_durable: bool
) -> str:
    """Why a publisher and a subscription cannot match ('' when they can).

    The request/offer rules of DDS for the two policies that differ in practice: a reliable
    subscription needs a reliable publisher; a transient-local one needs a transient-local one.
    """
    if sub_reliable and not pub_reliable:
        return "RELIABILITY"
    if sub_durable and not pub_durable:
        return "DURABILITY"
    return ""


@dataclass
class Problem:
    """One reason for a status level above OK: level (1 WARN, 2 ERROR) and a sentence."""

    level: int
    text: str


def camera_problems(
    label: str, counters: CameraCounters, received: int, started: float, now: float
) -> list[Problem]:
    """The camera's current problems (rejections and failures in the window, no frames)."""
    problems = []
    if now - counters.last_rejected_at <= WINDOW:
        total = sum(counters.rejected.values())
        problems.append(
            Problem(
                1,
                f"{label}: frames rejected ({total} so far; latest: {counters.last_rejection})",
            )
        )
    if now - counters.last_failed_at <= WINDOW:
        problems.append(
            Problem(2, f"{label}: {counters.failed_seen} frames failed in the model (see the log)")
        )
    if received == 0 and now - started > WINDOW:
        problems.append(Problem(1, f"no frames received on {label}"))
    return problems


def rejection_values(prefix: str, counters: CameraCounters, kinds: Iterable[str]) -> list:
    """(key, value) pairs: one per rejection kind, zeros included, so the set is complete."""
    return [(f"{prefix}rejected: {kind}", str(counters.rejected.get(kind, 0))) for kind in kinds]


def depth_values(prefix: str, depth: Any) -> list[tuple[str, str]]:
    """(key, value) pairs of a camera's depth input (depth.DepthInput) and ~/points."""
    return [
        (f"{prefix}depth images received", str(depth.received)),
        (f"{prefix}points published", str(depth.published)),
        (f"{prefix}points not made: no depth within depth.tolerance", str(depth.missing)),
        (f"{prefix}points not made: bad depth or camera_info", str(depth.unusable)),
    ]


def depth_problems(label: str, depth: Any, now: float) -> list[Problem]:
    """WARN while clouds were not made in the last WINDOW seconds (the latest reason)."""
    if now - depth.problem_at <= WINDOW:
        return [Problem(1, f"{label}: ~/points not published: {shorten(depth.problem)}")]
    return []
