"""The depth input of ~/points: decoding, nearest-neighbour resampling, pairing by stamp.

A depth image registered to the colour camera (RealSense `aligned_depth_to_color`, ZED
`depth/depth_registered`) is paired with a colour frame by stamp: the partner is the depth image
whose stamp is closest to the frame's, used when the two differ by at most `depth.tolerance`.
Nothing ever waits for depth: a colour frame is segmented as soon as the worker takes it, and one
without a partner when its outputs are published gives no cloud (counted in /diagnostics).
Latest-frame semantics as for colour: a camera keeps its last few depth images and the partners
of its last few colour frames, never a queue that grows.

Depth is 16UC1 (millimetres) or 32FC1 (metres); 0, NaN, inf, negative values and values beyond
`depth.max_range` are invalid and give NaN points. A depth image of another resolution than the
label image is resampled with nearest neighbour (pixel centres mapped onto pixel centres), as are
the grid points of a `points.stride` > 1 cloud, so a depth value is never blended across an edge.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np

from . import classmap
from .points import CloudBuilder, intrinsics_for

#: Depth encodings: numpy little-endian dtype and the factor to metres.
DEPTH_ENCODINGS = {"16UC1": ("<u2", 0.001), "32FC1": ("<f4", 1.0)}
#: Depth images kept for colour frames that arrive after their depth.
RECENT_DEPTH = 3
#: Colour frames (in the slot or just replaced) whose partners are tracked.
WAITING_COLOR = 4


class DepthError(ValueError):
    """A depth image that cannot be used; the message says why."""


def depth_array(msg: Any) -> tuple[np.ndarray, float]:
    """The raw depth of a sensor_msgs/Image (H x W, native byte order) and its factor to metres.

    Honours `step` (row padding) and `is_bigendian`. DepthError for another encoding or a buffer
    that does not fit the geometry.
    """
    encoding = str(msg.encoding)
    if encoding not in DEPTH_ENCODINGS:
        raise DepthError(
            f"depth encoding {encoding!r} is not supported; publish 16UC1 (millimetres) or "
            "32FC1 (metres), registered to the colour camera"
        )
    code, scale = DEPTH_ENCODINGS[encoding]
    dtype = np.dtype(code).newbyteorder(">" if msg.is_bigendian else "<")
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if height <= 0 or width <= 0 or step < width * dtype.itemsize or data.size < height * step:
        raise DepthError(
            f"depth image {width}x{height} with step {step} does not fit its {data.size} bytes"
        )
    rows = data[: height * step].reshape(height, step)[:, : width * dtype.itemsize]
    raw = np.ascontiguousarray(rows).view(dtype).reshape(height, width)
    if not dtype.isnative:
        raw = raw.astype(dtype.newbyteorder("="))
    return raw, scale


def nearest_indices(src: int, dst: int, stride: int = 1) -> np.ndarray:
    """Source index of every stride-th of `dst` positions: pixel centres onto pixel centres."""
    pos = np.arange(0, dst, stride, dtype=np.int64)
    return np.minimum(((2 * pos + 1) * src) // (2 * dst), src - 1)


def sample_grid(raw: np.ndarray, width: int, height: int, stride: int = 1) -> np.ndarray:
    """`raw` (any size) at the stride-th pixels of a width x height image, nearest neighbour."""
    h, w = raw.shape
    if (w, h) == (width, height):
        return raw[::stride, ::stride] if stride > 1 else raw
    rows = nearest_indices(h, height, stride)
    cols = nearest_indices(w, width, stride)
    return raw[rows[:, None], cols[None, :]]


def to_metres(raw: np.ndarray, scale: float, max_range: float) -> np.ndarray:
    """float32 metres, NaN where the depth is 0, negative, NaN, inf or beyond max_range."""
    z = raw.astype(np.float32)
    if scale != 1.0:
        z *= np.float32(scale)
    with np.errstate(invalid="ignore"):
        bad = ~((z > 0) & (z <= np.float32(max_range)))  # NaN compares False: invalid too
    z[bad] = np.nan
    return z


class DepthPairing:
    """Partners of colour frames among depth images, by stamp (thread-safe, bounded).

    The executor adds colour stamps and depth images as they arrive; the worker holds the colour
    frame it is segmenting and releases it, getting the depth image with the closest stamp seen
    meanwhile. Frames with an unset stamp (0) take the newest depth image.
    """

    def __init__(self, recent: int = RECENT_DEPTH, waiting: int = WAITING_COLOR) -> None:
        """Keep `recent` depth images and the partners of `waiting` colour frames."""
        self._lock = threading.Lock()
        self._recent: deque[tuple[int, Any]] = deque(maxlen=recent)
        self._waiting = waiting
        self._partners: OrderedDict[int, tuple[int, Any] | None] = OrderedDict()
        self._held: int | None = None

    def _best_recent(self, stamp: int) -> tuple[int, Any] | None:
        best = None
        for depth_stamp, depth in self._recent:
            delta = abs(depth_stamp - stamp)
            if best is None or delta < best[0]:
                best = (delta, depth)
        return best

    def add_depth(self, stamp: int, depth: Any) -> None:
        """A depth image arrived (executor thread)."""
        with self._lock:
            self._recent.append((stamp, depth))
            for color, partner in self._partners.items():
                delta = abs(stamp - color)
                if partner is None or delta < partner[0]:
                    self._partners[color] = (delta, depth)

    def add_color(self, stamp: int) -> None:
        """A colour frame arrived (executor thread): note its best partner so far."""
        with self._lock:
            self._partners[stamp] = self._best_recent(stamp)
            self._partners.move_to_end(stamp)
            excess = len(self._partners) - self._waiting
            if excess > 0:  # the oldest go, except the frame being segmented
                for color in [c for c in self._partners if c != self._held][:excess]:
                    del self._partners[color]

    def hold(self, stamp: int) -> None:
        """The worker took the colour frame stamped `stamp`: keep tracking its partner."""
        with self._lock:
            self._held = stamp
            if stamp not in self._partners:
                self._partners[stamp] = self._best_recent(stamp)

    def release(self, stamp: int, tolerance_ns: int) -> Any | None:
        """The partner of the held frame within the tolerance, or None; forgets older frames."""
        with self._lock:
            self._held = None
            if stamp == 0:
                return self._recent[-1][1] if self._recent else None
            partner = self._partners.pop(stamp, None)
            if partner is None:
                partner = self._best_recent(stamp)
            for older in [c for c in self._partners if c < stamp]:
                del self._partners[older]  # frames older than one processed never will be
        if partner is None or partner[0] > tolerance_ns:
            return None
        return partner[1]


class DepthInput:
    """One camera's depth: pairing, decoding, the cloud builder and the counters /diagnostics shows.

    The node calls on_depth / on_color from the executor, hold from the worker when it takes a
    frame, and cloud once the frame's labels and confidence exist.
    """

    def __init__(self) -> None:
        """No depth yet, counters at zero."""
        self.pairing = DepthPairing()
        self.builder = CloudBuilder()
        self.depth_info: Any = None  # <camera>/depth/camera_info, when depth.camera_info is depth
        self.received = 0  # depth images received
        self.published = 0  # clouds published
        self.missing = 0  # frames whose cloud was wanted and had no depth partner
        self.unusable = 0  # clouds not made: bad depth image or no usable camera_info
        self.problem = ""  # why the last cloud was not made
        self.problem_at = -math.inf  # time.monotonic() of that

    def on_depth(self, msg: Any) -> None:
        """Executor: a depth image arrived."""
        self.received += 1
        self.pairing.add_depth(classmap.stamp_ns(msg.header), msg)

    def on_color(self, header: Any) -> None:
        """Executor: a colour frame arrived."""
        self.pairing.add_color(classmap.stamp_ns(header))

    def hold(self, header: Any) -> None:
        """Worker: the frame with this header is being segmented."""
        self.pairing.hold(classmap.stamp_ns(header))

    def _fail(self, problem: str, missing: bool = False) -> None:
        if missing:
            self.missing += 1
        else:
            self.unusable += 1
        self.problem, self.problem_at = problem, time.monotonic()

    def cloud(
        self,
        header: Any,
        labels: np.ndarray,
        confidence: np.ndarray,
        num_classes: int,
        color_info: Any,
        options: Any,
    ) -> Any | None:
        """~/points for the frame with this header, or None (counted; `problem` says why).

        `options` is the node's NodeOptions (depth.* and points.stride are read per frame).
        """
        tolerance_ns = int(round(options.depth_tolerance * 1e9))
        depth_msg = self.pairing.release(classmap.stamp_ns(header), tolerance_ns)
        if depth_msg is None:
            self._fail(
                f"no depth image within depth.tolerance ({options.depth_tolerance:g} s) of the "
                "frame's stamp",
                missing=True,
            )
            return None
        use_depth_info = options.depth_camera_info == "depth"
        info = self.depth_info if use_depth_info else color_info
        topic = "depth/camera_info" if use_depth_info else "camera_info"
        if info is None:
            self._fail(f"no {topic} received yet (depth.camera_info: {options.depth_camera_info})")
            return None
        height, width = labels.shape
        stride = int(options.points_stride)
        try:
            intr = intrinsics_for(info.k, (int(info.width), int(info.height)), (width, height))
        except ValueError as exc:  # a K without focal lengths
            self._fail(f"{topic}: {exc}")
            return None
        try:
            raw, scale = depth_array(depth_msg)
        except DepthError as exc:
            self._fail(f"depth: {exc}")
            return None
        z = to_metres(sample_grid(raw, width, height, stride), scale, options.depth_max_range)
        msg = self.builder.message(header, z, labels, confidence, intr, num_classes, stride)
        self.published += 1
        return msg


def bench(sizes=((640, 480), (1280, 720)), frames: int = 200, stride: int = 1) -> list[str]:
    """Milliseconds per ~/points (pairing, 16UC1 decode, cloud message) at each size, as lines."""
    from types import SimpleNamespace

    from sensor_msgs.msg import CameraInfo, Image

    rng = np.random.default_rng(0)
    opts = SimpleNamespace(
        depth_tolerance=0.02, depth_max_range=10.0, depth_camera_info="color", points_stride=stride
    )
    lines = []
    for width, height in sizes:
        msg = Image(width=width, height=height, encoding="16UC1", step=2 * width)
        msg.data = rng.integers(0, 12000, (height, width)).astype("<u2").tobytes()
        info = CameraInfo(width=width, height=height)
        info.k = [0.8 * width, 0.0, width / 2, 0.0, 0.8 * width, height / 2, 0.0, 0.0, 1.0]
        labels = rng.integers(0, 20, (height, width)).astype(np.uint8)
        confidence = rng.integers(0, 256, (height, width)).astype(np.uint8)
        depth, times = DepthInput(), []
        for i in range(frames + 10):
            msg.header.stamp.sec = i + 1
            depth.on_depth(msg)
            depth.on_color(msg.header)
            depth.hold(msg.header)
            t0 = time.perf_counter()
            depth.cloud(msg.header, labels, confidence, 20, info, opts)
            times.append(time.perf_counter() - t0)
        ms = np.asarray(times[10:]) * 1e3
        lines.append(
            f"{width}x{height} stride {stride}: p50 {np.median(ms):.2f} ms, "
            f"p95 {np.percentile(ms, 95):.2f} ms, min {ms.min():.2f} ms ({frames} clouds)"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(bench()))
