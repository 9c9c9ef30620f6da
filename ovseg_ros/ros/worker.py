"""Per-camera latest-frame slots and the inference thread that serves them fairly.

Nothing here imports rclpy: the node hands frames in from its subscription callbacks and gets
results back through a callback, so the scheduling logic is tested without ROS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ovseg_ros.worker")


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

    def take(self, timeout: float | None = None) -> Frame | None:
        """The next waiting frame, cameras served in turn; None on timeout or when closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                n = len(self._order)
                for i in range(n):
                    camera = self._order[(self._next + i) % n]
                    frame = self._slots[camera]
                    if frame is not None:
                        self._slots[camera] = None
                        self._next = (self._next + i + 1) % n
                        return frame
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return None

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


class InferenceWorker:
    """A thread that takes frames from the slots and runs `process` on each, at most max_rate."""

    def __init__(
        self, slots: LatestFrameSlots, process: Callable[[Frame], None], max_rate_hz: float = 0.0
    ) -> None:
        """process(frame) runs in the worker thread; its exceptions are logged and counted."""
        self.slots = slots
        self.process = process
        self.max_rate_hz = max_rate_hz
        self._enabled = threading.Event()
        self._enabled.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_start = 0.0
        self.busy = threading.Event()  # set while a frame is being processed

    @property
    def enabled(self) -> bool:
        """Whether frames are being taken."""
        return self._enabled.is_set()

    def set_enabled(self, enabled: bool) -> None:
        """Pause (waiting frames are dropped) or resume taking frames."""
        if enabled:
            self._enabled.set()
        else:
            self._enabled.clear()
            self.slots.clear()

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self._thread = threading.Thread(target=self._run, name="ovseg-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask the thread to end after the frame in hand; True if it ended within timeout."""
        self._stop.set()
        self.slots.close()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _throttle(self) -> None:
        """Sleep so consecutive frames start at least 1/max_rate_hz apart."""
        if self.max_rate_hz > 0:
            wait = self._last_start + 1.0 / self.max_rate_hz - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)

    def _run(self) -> None:
        """Worker loop: wait for a frame, process it, repeat until stopped."""
        while not self._stop.is_set():
            if not self._enabled.wait(0.1):
                continue
            self._throttle()
            frame = self.slots.take(timeout=0.1)
            if frame is None or self._stop.is_set():
                continue
            if not self._enabled.is_set():
                self.slots.stats[frame.camera].dropped += 1
                continue
            self._last_start = time.monotonic()
            self.busy.set()
            try:
                self.process(frame)
                self.slots.stats[frame.camera].processed += 1
            except Exception:  # noqa: BLE001 - one bad frame must never end the worker
                self.slots.stats[frame.camera].failed += 1
                log.exception("processing a frame of camera %r failed", frame.camera)
            finally:
                self.busy.clear()
