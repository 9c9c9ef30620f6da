"""The node's frame pipeline: decode, segment and publish in three threads that overlap.

Nothing here imports rclpy: the node hands raw frames to the per-camera latest-frame slots
(worker.py) from its subscription callbacks and gives the pipeline three callables:

* decode(frame) -> Decoded | None runs in the decode thread as soon as a frame arrives while the
  camera's decoded slot (one frame) is empty, so the next frame is ready (decoded, checked,
  resized) while the current one is being segmented. None means the frame needs no work
  (rejected, nobody listens). When inference takes a decoded frame and a newer one has arrived
  meanwhile (a model slower than the camera), it takes the newer one and decodes it itself: the
  decoded one is dropped like a replaced raw frame. So inference always starts on the newest
  frame, latency never grows, and decoding costs at most two decodes per inference, never one
  per camera frame (a JPEG stream far faster than a CPU model would otherwise burn a core).
  A frame the decode thread finishes after a newer frame of its camera went into inference is
  dropped, so a camera's outputs never go back in time.
* segment(images) -> results runs in the inference thread on the waiting frames: the camera
  whose turn it is, plus (with batching) every other camera's waiting frame of the same size, so
  several cameras cost one forward pass. Cameras are served in turn.
* publish(decoded, result) runs in the publish thread, which encodes and publishes one frame's
  outputs while the next is segmented. The hand-off between inference and publishing holds one
  batch: inference waits for the publisher rather than queueing results, and results are
  published in the order they were segmented, so the class-map rule (no output with an older
  class map after a newer one was announced) holds as it did with one thread.

Per-camera counters stay in the slots' SlotStats: processed (handled: published, rejected or
skipped), dropped (replaced before inference took it), failed (an exception in any stage).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .worker import Frame, LatestFrameSlots

log = logging.getLogger("ovseg_ros.pipeline")


@dataclass
class Decoded:
    """A frame ready for inference: the RGB image and whatever the publisher needs besides."""

    frame: Frame
    image: Any  # HxWx3 uint8 RGB (numpy); frames of equal shape can share a forward pass
    context: Any = None  # the node's per-frame record (the outputs wanted, ...)
    decode_ms: float = 0.0  # time spent decoding it
    segment_ms: float = 0.0  # time of the forward pass it was in (set by the pipeline)

    @property
    def camera(self) -> str:
        """The camera the frame came from."""
        return self.frame.camera


class FramePipeline:
    """Decode, inference and publish threads over latest-frame slots (see the module doc)."""

    def __init__(
        self,
        slots: LatestFrameSlots,
        decode: Callable[[Frame], Decoded | None],
        segment: Callable[[list[Any]], Sequence[Any]],
        publish: Callable[[Decoded, Any], None],
        max_rate_hz: float = 0.0,
        batch: bool = True,
    ) -> None:
        """The callables run in the pipeline's threads; their exceptions are logged and counted."""
        self.slots = slots
        self._decode = decode
        self._segment = segment
        self._publish = publish
        self.max_rate_hz = max_rate_hz
        self.batch = batch
        self._order = slots.cameras
        self._decoded: dict[str, Decoded | None] = {c: None for c in self._order}
        self._next = 0  # round-robin position among the cameras' decoded frames
        self._handoff: tuple[list[Decoded], Sequence[Any]] | None = None
        self._cond = threading.Condition(threading.RLock())
        self._enabled = threading.Event()
        self._enabled.set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_start = 0.0
        self._inference_ended = False
        # Per camera, when the newest frame given to inference arrived: an older frame decoded
        # meanwhile (the decode thread was at it) is dropped, never published after a newer one.
        self._latest_taken: dict[str, float] = {c: float("-inf") for c in self._order}
        self._in_flight = 0  # frames held by a stage (taken from a slot, not yet counted)
        self.busy = threading.Event()  # set while any stage holds a frame
        self.batches = 0  # forward passes with more than one camera's frame

    # --- control -------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether frames are being taken."""
        return self._enabled.is_set()

    def set_enabled(self, enabled: bool) -> None:
        """Pause (waiting frames, raw and decoded, are dropped) or resume taking frames."""
        if enabled:
            self._enabled.set()
            return
        self._enabled.clear()
        self.slots.clear()
        with self._cond:
            for camera, item in self._decoded.items():
                if item is not None:
                    self._decoded[camera] = None
                    self.slots.stats[camera].dropped += 1
                    self._release(1)

    def start(self) -> None:
        """Start the three threads (once)."""
        if self._threads:
            raise RuntimeError("pipeline already started")
        for name, target in (
            ("decode", self._decode_loop),
            ("inference", self._inference_loop),
            ("publish", self._publish_loop),
        ):
            thread = threading.Thread(target=target, name=f"ovseg-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """End the threads after the frames in hand; True if all ended within timeout."""
        self._stop.set()
        self.slots.close()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def alive(self) -> bool:
        """True while all three threads run."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def ended(self) -> bool:
        """True when no thread runs (never started, or stopped)."""
        return not any(t.is_alive() for t in self._threads)

    def idle(self) -> bool:
        """True when no stage holds a frame."""
        return not self.busy.is_set()

    # --- bookkeeping ---------------------------------------------------------------------------

    def _hold(self) -> None:
        with self._cond:
            self._in_flight += 1
            self.busy.set()

    def _release(self, count: int) -> None:
        """Frames leave the pipeline (the condition's lock is reentrant: callable under it)."""
        with self._cond:
            self._in_flight = max(0, self._in_flight - count)
            if not self._in_flight:
                self.busy.clear()

    def _count(self, camera: str, what: str, count: int = 1) -> None:
        stats = self.slots.stats[camera]
        setattr(stats, what, getattr(stats, what) + count)

    # --- stages --------------------------------------------------------------------------------

    def _decode_loop(self) -> None:
        while not self._stop.is_set():
            if not self._enabled.wait(0.1):
                continue
            frame = self.slots.take(timeout=0.1, skip=self._holds_decoded)
            if frame is None:
                continue
            self._hold()
            try:
                item = self._decode(frame)
            except Exception:  # noqa: BLE001 - one bad frame must never end the pipeline
                self._count(frame.camera, "failed")
                self._release(1)
                log.exception("decoding a frame of camera %r failed", frame.camera)
                continue
            if item is None:  # nothing to do for this frame (rejected, or nobody listens)
                self._count(frame.camera, "processed")
                self._release(1)
                continue
            with self._cond:
                if self._stop.is_set() or not self._enabled.is_set():
                    self._count(frame.camera, "dropped")
                    self._release(1)
                    continue
                if frame.received <= self._latest_taken[frame.camera]:
                    self._count(frame.camera, "dropped")  # a newer one is already in inference
                    self._release(1)
                    continue
                if self._decoded[frame.camera] is not None:  # inference never took it
                    self._count(frame.camera, "dropped")
                    self._release(1)
                self._decoded[frame.camera] = item
                self._cond.notify_all()

    def _holds_decoded(self, camera: str) -> bool:
        """Whether the camera's decoded slot is full (the decode thread waits for it)."""
        return self._decoded[camera] is not None

    def _freshest(self, item: Decoded) -> Decoded | None:
        """The decoded frame, or the camera's newer raw frame decoded here (None: no work)."""
        newer = self.slots.take_camera(item.camera)
        if newer is None:
            return item
        self._hold()
        self._count(item.camera, "dropped")  # replaced by a newer frame before inference
        self._release(1)
        try:
            fresh = self._decode(newer)
        except Exception:  # noqa: BLE001
            self._count(newer.camera, "failed")
            self._release(1)
            log.exception("decoding a frame of camera %r failed", newer.camera)
            return None
        if fresh is None:
            self._count(newer.camera, "processed")
            self._release(1)
        return fresh

    def _throttle(self) -> None:
        """Sleep so consecutive passes start at least 1/max_rate_hz apart."""
        if self.max_rate_hz > 0:
            wait = self._last_start + 1.0 / self.max_rate_hz - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)

    def _take_batch(self, timeout: float) -> list[Decoded]:
        """The decoded frame of the camera whose turn it is, and (batching) others of its size."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._stop.is_set():
                n = len(self._order)
                for i in range(n):
                    first = self._decoded[self._order[(self._next + i) % n]]
                    if first is None:
                        continue
                    self._next = (self._next + i + 1) % n
                    batch = [first]
                    if self.batch:
                        shape = getattr(first.image, "shape", None)
                        batch += [
                            item
                            for camera in self._order
                            if (item := self._decoded[camera]) is not None
                            and item is not first
                            and getattr(item.image, "shape", None) == shape
                        ]
                    for item in batch:
                        self._decoded[item.camera] = None
                    return batch
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            return []

    def _mark_taken(self, batch: list[Decoded]) -> None:
        """Record the batch's frames as the newest in inference; drop older decoded ones."""
        with self._cond:
            for item in batch:
                camera = item.camera
                self._latest_taken[camera] = max(self._latest_taken[camera], item.frame.received)
                held = self._decoded[camera]
                if held is not None and held.frame.received <= self._latest_taken[camera]:
                    self._decoded[camera] = None
                    self._count(camera, "dropped")
                    self._release(1)

    def _inference_loop(self) -> None:
        try:
            self._infer_until_stopped()
        finally:
            with self._cond:
                self._inference_ended = True
                self._cond.notify_all()

    def _infer_until_stopped(self) -> None:
        while not self._stop.is_set():
            if not self._enabled.wait(0.1):
                continue
            self._throttle()
            taken = self._take_batch(timeout=0.1)
            if not taken:
                continue
            self.slots.wake()  # the decode thread may fill the emptied decoded slots
            batch = [fresh for item in taken if (fresh := self._freshest(item)) is not None]
            if not batch:
                continue
            self._mark_taken(batch)
            self._last_start = time.monotonic()
            started = time.perf_counter()
            try:
                results = self._segment([item.image for item in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} frames")
            except Exception:  # noqa: BLE001
                for item in batch:
                    self._count(item.camera, "failed")
                self._release(len(batch))
                log.exception("segmenting frames of %s failed", [i.camera for i in batch])
                continue
            segment_ms = (time.perf_counter() - started) * 1e3
            for item in batch:
                item.segment_ms = segment_ms
            if len(batch) > 1:
                self.batches += 1
            with self._cond:
                # One batch waits for the publisher at most: inference never runs ahead of it.
                while self._handoff is not None:
                    self._cond.wait(0.1)
                self._handoff = (batch, results)
                self._cond.notify_all()

    def _publish_loop(self) -> None:
        while True:
            with self._cond:
                while self._handoff is None and not self._inference_ended:
                    self._cond.wait(0.1)
                if self._handoff is None:
                    return  # stopped, and inference handed over its last batch
                batch, results = self._handoff
                self._handoff = None
                self._cond.notify_all()
            for item, result in zip(batch, results, strict=True):
                try:
                    self._publish(item, result)
                    self._count(item.camera, "processed")
                except Exception:  # noqa: BLE001
                    self._count(item.camera, "failed")
                    log.exception("publishing a frame of camera %r failed", item.camera)
                finally:
                    self._release(1)
