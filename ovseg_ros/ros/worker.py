"""Per-camera latest-frame slots, served in turn (the threads that take from them: pipeline.py).

Nothing here imports rclpy: the node hands frames in from its subscription callbacks, so the
scheduling logic is tested without ROS.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Frame:
    """One decoded camera frame waiting for inference."""

    camera: str
    image: Any  # HxWx3 uint8 RGB (numpy)
    header: Any  # the input message's header, copied to every output
    received: float = field(default_factory=time.monotonic)


@dataclass
class SlotStats:
    """Counters of one camera's slot."""

    received: int = 0
    dropped: int = 0  # frames replaced before the worker took them
    processed: int = 0
    failed: int = 0


class LatestFrameSlots:
    """One slot per camera: a new frame replaces an unprocessed one (counted as a drop)."""

    def __init__(self, cameras: Sequence[str]) -> None:
        """Create an empty slot for every camera name."""
        if not cameras:
            raise ValueError("at least one camera slot is needed")
        self._order = list(dict.fromkeys(cameras))
        self._slots: dict[str, Frame | None] = {c: None for c in self._order}
        self.stats: dict[str, SlotStats] = {c: SlotStats() for c in self._order}
        self._cond = threading.Condition()
        self._next = 0  # round-robin position: the camera served after the last one
        self._closed = False

    @property
    def cameras(self) -> list[str]:
        """Camera names in declaration order."""
        return list(self._order)

    def put(self, frame: Frame) -> bool:
        """Store the camera's newest frame; True if it replaced one the worker never took."""
        with self._cond:
            if frame.camera not in self._slots:
                raise KeyError(f"unknown camera {frame.camera!r}")
            stats = self.stats[frame.camera]
            stats.received += 1
            replaced = self._slots[frame.camera] is not None
            if replaced:
                stats.dropped += 1
            self._slots[frame.camera] = frame
            self._cond.notify()
            return replaced

    def take(
        self, timeout: float | None = None, skip: Callable[[str], bool] | None = None
    ) -> Frame | None:
        """The next waiting frame, cameras served in turn; None on timeout or when closed.

        Cameras for which skip(camera) is true are passed over (their frames stay); a change
        of what skip says is signalled with wake().
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                n = len(self._order)
                for i in range(n):
                    camera = self._order[(self._next + i) % n]
                    frame = self._slots[camera]
                    if frame is not None and not (skip is not None and skip(camera)):
                        self._slots[camera] = None
                        self._next = (self._next + i + 1) % n
                        return frame
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return None

    def take_camera(self, camera: str) -> Frame | None:
        """That camera's waiting frame, if any, at once."""
        with self._cond:
            frame, self._slots[camera] = self._slots[camera], None
            return frame

    def wake(self) -> None:
        """Make waiting take() calls look again (what their skip says has changed)."""
        with self._cond:
            self._cond.notify_all()

    def clear(self) -> int:
        """Drop every waiting frame (counted as drops); return how many there were."""
        with self._cond:
            count = 0
            for camera, frame in self._slots.items():
                if frame is not None:
                    self.stats[camera].dropped += 1
                    self._slots[camera] = None
                    count += 1
            return count

    def close(self) -> None:
        """Wake every waiter; take() returns None from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
