"""`sample_camera`: a stand-in camera for the ovseg node, and a monitor of what comes back.

It publishes frames on ``image`` (plus ``camera_info`` and, with ``--compressed``,
``image/compressed``) from the sample photos of scikit-image, a folder of images, a video file or
a webcam, and listens to the node's ``labels``, ``overlay`` and ``vocabulary`` outputs. Once per
second it prints one line: input and output rates, end-to-end latency (receive time minus the
output's header stamp, which the node copies from the input frame) and the classes in the last
label image. Overlays are saved as PNG files.

The pieces are separate so they can be tested without DDS: ``FrameSource`` (frames from each kind
of source, resized), ``frame_to_msg`` / ``frame_to_compressed`` / ``pinhole_camera_info`` (the
messages), ``Stats`` (window counters, percentiles, class shares, the printed lines) and
``OverlayWriter`` (PNG files); ``SampleCameraNode`` wires them to rclpy.
"""

from __future__ import annotations

import argparse
import array
import json
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header, String

from .classmap import ClassMapHistory, stamp_from_dict
from .classmap import stamp_ns as _stamp_ns
from .codec import ImageDecodeError, image_to_rgb, msg_to_array

try:  # Humble has ExternalShutdownException too; the fallback only guards older releases.
    from rclpy.executors import ExternalShutdownException
except ImportError:  # pragma: no cover
    ExternalShutdownException = KeyboardInterrupt  # type: ignore[misc,assignment]

try:  # Iron and newer
    from rclpy.event_handler import PublisherEventCallbacks, SubscriptionEventCallbacks
except ImportError:  # pragma: no cover - Humble
    from rclpy.qos_event import (  # type: ignore[no-redef]
        PublisherEventCallbacks,
        SubscriptionEventCallbacks,
    )

__all__ = [
    "ENCODINGS",
    "FrameSource",
    "OverlayWriter",
    "SampleCameraNode",
    "SourceError",
    "Stats",
    "VocabularyMap",
    "configure_environment",
    "fit_frame",
    "frame_to_compressed",
    "depth_to_msg",
    "floor_depth",
    "frame_to_msg",
    "main",
    "parse_size",
    "parse_vocabulary_json",
    "pinhole_camera_info",
]

PROG = "sample_camera"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: Encodings the camera can publish (sensor_msgs/image_encodings.hpp names; all read by the node).
ENCODINGS: tuple[str, ...] = (
    "rgb8",
    "bgr8",
    "rgba8",
    "bgra8",
    "mono8",
    "mono16",
    "yuv422",
    "yuv422_yuy2",
)

DEFAULT_SIZE = (640, 480)


class SourceError(RuntimeError):
    """A frame source that cannot be opened or read; the message says which and why."""


# --- frames --------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int] | None:
    """'640x480' -> (640, 480); 'native' -> None (frames keep their own size)."""
    value = text.strip().lower()
    if value == "native":
        return None
    parts = value.split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size must be WIDTHxHEIGHT (e.g. 640x480) or 'native', got {text!r}")
    width, height = int(parts[0]), int(parts[1])
    if not (1 <= width <= 16384 and 1 <= height <= 16384):
        raise ValueError(f"size {width}x{height} is out of range (1 to 16384 pixels a side)")
    return width, height


def fit_frame(rgb: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize keeping the aspect ratio until the frame covers ``size`` (w, h), then centre-crop.

    ``None`` returns the frame as it is (contiguous).
    """
    if size is None:
        return np.ascontiguousarray(rgb)
    width, height = size
    in_h, in_w = rgb.shape[:2]
    scale = max(width / in_w, height / in_h)
    new_w = max(width, round(in_w * scale))
    new_h = max(height, round(in_h * scale))
    if (new_w, new_h) != (in_w, in_h):
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=interp)
    x0 = (new_w - width) // 2
    y0 = (new_h - height) // 2
    return np.ascontiguousarray(rgb[y0 : y0 + height, x0 : x0 + width])


def _bgr_to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class FrameSource:
    """Iterates HxWx3 uint8 RGB frames of one source, resized by ``fit_frame``.

    Kinds: ``samples`` (the photos bundled with scikit-image), ``folder`` (image files of a
    folder, sorted by name), ``video`` (a file OpenCV can read) and ``webcam`` (a
    cv2.VideoCapture device index). Samples, folders and videos start again at the end when
    ``loop`` is true; a webcam never ends. The source is opened (and checked) by the
    constructor: SourceError says what is wrong. ``warn`` receives messages about skipped files.
    """

    KINDS = ("samples", "folder", "video", "webcam")

    def __init__(
        self,
        kind: str = "samples",
        target: str | int | Path | None = None,
        *,
        size: tuple[int, int] | None = DEFAULT_SIZE,
        loop: bool = True,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown source kind {kind!r}; one of {', '.join(self.KINDS)}")
        self.kind = kind
        self.size = size
        self.loop = loop
        self._warn = warn or (lambda text: print(f"{PROG}: {text}", file=sys.stderr))
        self._index = 0
        self._cap: Any = None
        self._pending: np.ndarray | None = None
        self._frames: list[np.ndarray] = []
        self._files: list[Path] = []
        self._bad_files: set[Path] = set()
        self._exhausted = False
        self.frames_read = 0
        if kind == "samples":
            self._open_samples()
        elif kind == "folder":
            self.path = Path(str(target))
            self._open_folder()
        elif kind == "video":
            self.path = Path(str(target))
            self._open_video()
        else:
            self.device = int(target or 0)
            self._open_webcam()

    # Constructors by kind, for readability at the call site.
    @classmethod
    def samples(cls, size=DEFAULT_SIZE, loop: bool = True, **kwargs) -> FrameSource:
        return cls("samples", None, size=size, loop=loop, **kwargs)

    @classmethod
    def folder(cls, path, size=DEFAULT_SIZE, loop: bool = True, **kwargs) -> FrameSource:
        return cls("folder", path, size=size, loop=loop, **kwargs)

    @classmethod
    def video(cls, path, size=DEFAULT_SIZE, loop: bool = True, **kwargs) -> FrameSource:
        return cls("video", path, size=size, loop=loop, **kwargs)

    @classmethod
    def webcam(cls, index: int = 0, size=DEFAULT_SIZE, **kwargs) -> FrameSource:
        return cls("webcam", index, size=size, loop=True, **kwargs)

    def describe(self) -> str:
        """A short human description, for the start-up message."""
        size = "native size" if self.size is None else f"{self.size[0]}x{self.size[1]}"
        if self.kind == "samples":
            what = f"{len(self._frames)} sample photos of skimage.data"
        elif self.kind == "folder":
            what = f"{len(self._files)} images of folder {self.path}"
        elif self.kind == "video":
            what = f"video {self.path}"
        else:
            what = f"webcam {self.device}"
        once = "" if self.kind == "webcam" else (", looping" if self.loop else ", once")
        return f"{what} ({size}{once})"

    # --- opening ---------------------------------------------------------------------------

    def _open_samples(self) -> None:
        # Imported here: ovseg_ros.samples pulls in the engine (and torch), which only this
        # source needs.
        from ..samples import sample_images

        self._frames = [fit_frame(rgb, self.size) for _name, rgb in sample_images()]

    def _open_folder(self) -> None:
        path = self.path
        if not path.exists():
            raise SourceError(f"folder '{path}' does not exist")
        if not path.is_dir():
            raise SourceError(f"'{path}' is not a folder (use --video for a video file)")
        try:
            entries = sorted(path.iterdir())
        except OSError as exc:
            raise SourceError(f"cannot read folder '{path}': {exc.strerror or exc}") from exc
        self._files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        if not self._files:
            raise SourceError(
                f"folder '{path}' has no images (looked for {', '.join(IMAGE_SUFFIXES)})"
            )
        first = self._next_folder_frame()
        if first is None:
            raise SourceError(f"none of the {len(self._files)} images in '{path}' can be read")
        self._pending = first

    def _open_video(self) -> None:
        path = self.path
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a file"
            raise SourceError(f"video '{path}' {what}")
        if not os.access(path, os.R_OK):
            raise SourceError(f"video '{path}' is not readable (permission denied)")
        self._cap = cv2.VideoCapture(str(path))
        if not self._cap.isOpened():
            self._release()
            raise SourceError(
                f"cannot open video '{path}': OpenCV cannot decode it (not a video, or a codec "
                f"this OpenCV build lacks)"
            )
        ok, frame = self._cap.read()
        if not ok or frame is None:
            self._release()
            raise SourceError(f"video '{path}' has no readable frames")
        self._pending = _bgr_to_rgb(frame)

    def _open_webcam(self) -> None:
        self._cap = cv2.VideoCapture(self.device)
        if not self._cap.isOpened():
            self._release()
            raise SourceError(
                f"cannot open webcam {self.device} (no camera with that index, or it is busy or "
                f"not permitted; on Linux check /dev/video{self.device})"
            )
        # Keep at most one queued frame, so a slow --rate still sends recent pictures.
        self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        ok, frame = self._cap.read()
        if not ok or frame is None:
            self._release()
            raise SourceError(f"webcam {self.device} opened but delivers no frames")
        self._pending = _bgr_to_rgb(frame)

    # --- reading ---------------------------------------------------------------------------

    def _next_folder_frame(self) -> np.ndarray | None:
        """The next readable image of the folder (wrapping once at most), or None."""
        tried = 0
        while tried < len(self._files):
            if self._index >= len(self._files):
                if not self.loop and self.frames_read > 0:
                    return None
                self._index = 0
            path = self._files[self._index]
            self._index += 1
            tried += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                if path not in self._bad_files:
                    self._bad_files.add(path)
                    self._warn(f"skipping '{path}': not a readable image")
                continue
            return _bgr_to_rgb(image)
        return None

    def _next_raw(self) -> np.ndarray | None:
        if self._pending is not None:
            frame, self._pending = self._pending, None
            return frame
        if self.kind == "samples":
            if self._index >= len(self._frames):
                if not self.loop:
                    return None
                self._index = 0
            frame = self._frames[self._index]
            self._index += 1
            return frame
        if self.kind == "folder":
            if not self.loop and self._index >= len(self._files):
                return None
            return self._next_folder_frame()
        ok, frame = self._cap.read()
        if ok and frame is not None:
            return _bgr_to_rgb(frame)
        if self.kind == "webcam":
            raise SourceError(f"webcam {self.device} stopped delivering frames")
        if not self.loop:
            return None
        # End of the video: rewind (or reopen when the backend cannot seek).
        self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        ok, frame = self._cap.read()
        if not ok or frame is None:
            self._release()
            self._cap = cv2.VideoCapture(str(self.path))
            ok, frame = self._cap.read()
        if not ok or frame is None:
            raise SourceError(f"video '{self.path}' cannot be read again from the start")
        return _bgr_to_rgb(frame)

    def read(self) -> np.ndarray | None:
        """The next frame (HxWx3 uint8 RGB at the requested size), or None at the end."""
        if self._exhausted:
            return None
        frame = self._next_raw()
        if frame is None:
            self._exhausted = True
            return None
        self.frames_read += 1
        if self.kind == "samples":
            return frame  # resized once when opened
        return fit_frame(frame, self.size)

    def __iter__(self) -> Iterator[np.ndarray]:
        while (frame := self.read()) is not None:
            yield frame

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def close(self) -> None:
        self._release()

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --- messages ------------------------------------------------------------------------------


def _image_msg(pixels: np.ndarray, encoding: str, header: Header, bytes_per_pixel: int) -> Image:
    msg = Image()
    msg.header = header
    msg.height = int(pixels.shape[0])
    msg.width = int(pixels.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * bytes_per_pixel
    data = array.array("B")
    data.frombytes(np.ascontiguousarray(pixels).reshape(-1).view(np.uint8))
    msg.data = data  # assigned after construction: no second copy in __init__
    return msg


def _even_width(rgb: np.ndarray) -> np.ndarray:
    return rgb if rgb.shape[1] % 2 == 0 else rgb[:, : rgb.shape[1] - 1]


def _rgb_to_yuv422(rgb: np.ndarray, uyvy: bool) -> np.ndarray:
    """HxWx3 RGB (even W) -> HxWx2 packed 4:2:2 (UYVY or YUY2), BT.601 limited range.

    The inverse of what OpenCV's COLOR_YUV2RGB_UYVY / _YUY2 decode; chroma averaged per pair.
    """
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = 16.0 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128.0 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128.0 + 0.439 * r - 0.368 * g - 0.071 * b
    u = (u[:, 0::2] + u[:, 1::2]) / 2.0
    v = (v[:, 0::2] + v[:, 1::2]) / 2.0
    out = np.empty((*rgb.shape[:2], 2), np.float32)
    luma, chroma = (1, 0) if uyvy else (0, 1)
    out[..., luma] = y
    out[:, 0::2, chroma] = u
    out[:, 1::2, chroma] = v
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def frame_to_msg(rgb: np.ndarray, encoding: str, header: Header) -> Image:
    """Encode an HxWx3 uint8 RGB frame as a sensor_msgs/Image in ``encoding`` (see ENCODINGS).

    mono16 spreads the 8-bit gray values over 16 bits (x 257); the YUV 4:2:2 encodings need an
    even width, so an odd last column is dropped.
    """
    if encoding == "rgb8":
        return _image_msg(rgb, "rgb8", header, 3)
    if encoding == "bgr8":
        return _image_msg(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), "bgr8", header, 3)
    if encoding == "rgba8":
        return _image_msg(cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA), "rgba8", header, 4)
    if encoding == "bgra8":
        return _image_msg(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA), "bgra8", header, 4)
    if encoding == "mono8":
        return _image_msg(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), "mono8", header, 1)
    if encoding == "mono16":
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype("<u2") * np.uint16(257)
        return _image_msg(gray.astype("<u2"), "mono16", header, 2)
    if encoding in ("yuv422", "yuv422_yuy2"):
        code = "COLOR_RGB2YUV_UYVY" if encoding == "yuv422" else "COLOR_RGB2YUV_YUY2"
        even = np.ascontiguousarray(_even_width(rgb))
        if hasattr(cv2, code):
            yuv = cv2.cvtColor(even, getattr(cv2, code))
        else:  # OpenCV < 4.7 (Ubuntu 24.04 has 4.6) decodes 4:2:2 but cannot encode it
            yuv = _rgb_to_yuv422(even, uyvy=encoding == "yuv422")
        return _image_msg(yuv, encoding, header, 2)
    raise ValueError(f"unsupported encoding {encoding!r}; one of {', '.join(ENCODINGS)}")


def frame_to_compressed(
    rgb: np.ndarray, header: Header, *, encoding: str = "rgb8", quality: int = 90
) -> CompressedImage:
    """JPEG-compress a frame as image_transport's compressed plugin does.

    ``format`` is ``"<encoding>; jpeg compressed bgr8"`` (``mono8`` for gray encodings).
    """
    params = [cv2.IMWRITE_JPEG_QUALITY, min(max(int(quality), 1), 100)]
    if encoding.startswith("mono"):
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), params)
        fmt = f"{encoding}; jpeg compressed mono8"
    else:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
        fmt = f"{encoding}; jpeg compressed bgr8"
    if not ok:
        raise ValueError("OpenCV could not JPEG-encode the frame")
    msg = CompressedImage()
    msg.header = header
    msg.format = fmt
    data = array.array("B")
    data.frombytes(buf.reshape(-1))
    msg.data = data
    return msg


def pinhole_camera_info(
    width: int, height: int, header: Header, *, hfov_deg: float = 60.0
) -> CameraInfo:
    """A distortion-free pinhole model for a ``width`` x ``height`` image.

    Square pixels, focal length from the horizontal field of view (60 degrees, a typical webcam),
    principal point at the image centre ((w - 1) / 2, (h - 1) / 2).
    """
    f = 0.5 * width / math.tan(math.radians(hfov_deg) / 2.0)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    info = CameraInfo()
    info.header = header
    info.width = int(width)
    info.height = int(height)
    info.distortion_model = "plumb_bob"
    info.d = [0.0] * 5
    info.k = [f, 0.0, cx, 0.0, f, cy, 0.0, 0.0, 1.0]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.p = [f, 0.0, cx, 0.0, 0.0, f, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


def floor_depth(
    width: int,
    height: int,
    k: Sequence[float],
    *,
    camera_height: float = 1.0,
    pitch_deg: float = 30.0,
) -> np.ndarray:
    """Depth of a flat floor, as a registered depth camera would see it (uint16 millimetres).

    The camera (pinhole K) is ``camera_height`` metres above the floor and pitched ``pitch_deg``
    down, so the floor is a tilted plane in the optical frame: a pixel's ray (x', y', 1) meets it
    at z = h / (cos(p) * y' + sin(p)). Pixels at or above the horizon, and depth beyond 65.535 m,
    are 0 (no return), as with a real depth camera.
    """
    fy, cy = float(k[4]), float(k[5])
    pitch = math.radians(pitch_deg)
    slope = (np.arange(height, dtype=np.float64) - cy) / fy
    denom = math.cos(pitch) * slope + math.sin(pitch)
    with np.errstate(divide="ignore"):
        z_mm = np.where(denom > 0, camera_height / np.where(denom > 0, denom, 1.0) * 1000.0, 0.0)
    z_mm = np.where(z_mm <= 65535.0, np.rint(z_mm), 0.0).astype("<u2")
    return np.ascontiguousarray(np.broadcast_to(z_mm[:, None], (height, width)))


def depth_to_msg(depth_mm: np.ndarray, header: Header) -> Image:
    """A uint16 millimetre depth image as sensor_msgs/Image 16UC1."""
    return _image_msg(depth_mm.astype("<u2", copy=False), "16UC1", header, 2)


# --- monitor statistics --------------------------------------------------------------------


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


# --- the node ------------------------------------------------------------------------------


@dataclass
class CameraOptions:
    """Settings of SampleCameraNode (the command line fills them)."""

    rate: float = 2.0
    encoding: str = "rgb8"
    compressed: bool = False
    jpeg_quality: int = 90
    qos: str = "sensor_data"
    frame_id: str = "camera"
    hfov_deg: float = 60.0
    monitor_node: str = "/ovseg"
    out_dir: str = "out/stream"
    save_every: int = 1
    max_frames: int = 0  # 0 = no limit
    depth: bool = False  # also publish depth + depth/camera_info (floor_depth) and watch ~/points
    duration: float = 0.0  # seconds; 0 = no limit
    linger: float = 3.0  # seconds to wait for outputs after the last frame
    report_period: float = 1.0


def camera_qos(name: str) -> QoSProfile:
    """``sensor_data``: best effort, keep last 1 (as camera drivers do); ``reliable``."""
    if name not in ("sensor_data", "reliable"):
        raise ValueError(f"qos must be sensor_data or reliable, got {name!r}")
    reliability = (
        ReliabilityPolicy.BEST_EFFORT if name == "sensor_data" else (ReliabilityPolicy.RELIABLE)
    )
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=1,
        reliability=reliability,
        durability=DurabilityPolicy.VOLATILE,
    )


#: The node's image outputs: reliable, keep last 1 (the node's default output QoS).
OUTPUT_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)

#: ``~/vocabulary`` is latched: reliable + transient_local, depth 1.
VOCABULARY_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


class SampleCameraNode(Node):
    """Publishes frames of a FrameSource and monitors the segmentation node's outputs.

    ``finished`` turns true when a limit is reached (``max_frames`` / the end of a source that
    does not loop, then ``linger`` seconds or the output of the last frame; ``duration``) or the
    source fails (``error`` holds why). Each report line goes to ``printer``.
    """

    def __init__(
        self,
        source: FrameSource,
        options: CameraOptions | None = None,
        *,
        context: Context | None = None,
        node_name: str = PROG,
        printer: Callable[[str], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        options = options or CameraOptions()
        if options.rate <= 0:
            raise ValueError(f"rate must be positive, got {options.rate}")
        # Before the node exists, so an unusable output folder leaves nothing to clean up.
        writer = OverlayWriter(options.out_dir, options.save_every) if options.out_dir else None
        super().__init__(node_name, context=context)
        self.options = options
        self.writer = writer
        self.source = source
        self._printer = printer or (lambda line: print(line, flush=True))
        self._monotonic = monotonic
        self.started = monotonic()
        base = options.monitor_node.rstrip("/") or "/ovseg"
        self.labels_topic = f"{base}/labels"
        self.overlay_topic = f"{base}/overlay"
        self.vocabulary_topic = f"{base}/vocabulary"
        self.stats = Stats(self.labels_topic, start=self.started)
        self.error: str | None = None
        self.finished = False
        self.finish_reason = ""
        self._publishing_done_at: float | None = None
        self._last_published_ns: int | None = None
        self._last_output_ns = -1
        # Stamps of the last frames sent: an output with another stamp answers someone else.
        self._recent_stamps: deque[int] = deque(maxlen=256)
        self._recent_set: set[int] = set()
        self._write_failed = False
        self._warned: set[str] = set()

        qos = camera_qos(options.qos)
        pub_events = PublisherEventCallbacks(incompatible_qos=self._on_incompatible_publisher)
        self.image_pub = self.create_publisher(Image, "image", qos, event_callbacks=pub_events)
        self.info_pub = self.create_publisher(CameraInfo, "camera_info", qos)
        self.compressed_pub = (
            self.create_publisher(CompressedImage, "image/compressed", qos)
            if options.compressed
            else None
        )
        self.depth_pub = self.depth_info_pub = None
        self.points_received = 0
        self.points_valid = 0.0  # share of points with a finite z in the last cloud
        if options.depth:
            self.depth_pub = self.create_publisher(Image, "depth", qos)
            self.depth_info_pub = self.create_publisher(CameraInfo, "depth/camera_info", qos)
            self.create_subscription(PointCloud2, f"{base}/points", self._on_points, OUTPUT_QOS)

        def sub_events(topic: str) -> SubscriptionEventCallbacks:
            return SubscriptionEventCallbacks(
                incompatible_qos=lambda event: self._on_incompatible_subscription(topic, event)
            )

        # The class maps first: rclpy's executor takes ready subscriptions in the order they were
        # created, so a class map and a label image waiting together are handled map first, and
        # the node delivers a map before any label image that uses it (README, class-map rule).
        self.create_subscription(
            String,
            self.vocabulary_topic,
            self._on_vocabulary,
            VOCABULARY_QOS,
            event_callbacks=sub_events(self.vocabulary_topic),
        )
        self.create_subscription(
            Image,
            self.labels_topic,
            self._on_labels,
            OUTPUT_QOS,
            event_callbacks=sub_events(self.labels_topic),
        )
        self.create_subscription(
            Image,
            self.overlay_topic,
            self._on_overlay,
            OUTPUT_QOS,
            event_callbacks=sub_events(self.overlay_topic),
        )
        self._publish_timer = self.create_timer(1.0 / options.rate, self._publish_next)
        self._report_timer = self.create_timer(options.report_period, self._report)
        # Limits are checked more often than a slow --rate publishes.
        self._limit_timer = self.create_timer(0.1, self._check_limits)

    # --- publishing ------------------------------------------------------------------------

    def _check_limits(self) -> None:
        if self.finished:
            return
        now = self._monotonic()
        if self.options.duration > 0 and now - self.started >= self.options.duration:
            self._finish(f"duration of {self.options.duration:g} s reached")
        elif self._publishing_done_at is not None:
            self._check_linger(now)

    def _publish_next(self) -> None:
        self._check_limits()
        if self.finished or self._publishing_done_at is not None:
            return
        try:
            frame = self.source.read()
        except SourceError as exc:
            self.error = str(exc)
            self._finish(f"source failed: {exc}")
            return
        if frame is None:
            self._publishing_done(self._monotonic(), "end of the source")
            return
        self.publish_frame(frame)
        if self.options.max_frames and self.stats.published >= self.options.max_frames:
            self._publishing_done(self._monotonic(), f"{self.options.max_frames} frames published")

    def publish_frame(self, rgb: np.ndarray) -> Header:
        """Publish one frame (image, camera_info, compressed) stamped with the current time."""
        stamp = self.get_clock().now().to_msg()
        header = Header(stamp=stamp, frame_id=self.options.frame_id)
        msg = frame_to_msg(rgb, self.options.encoding, header)
        self.image_pub.publish(msg)
        info = pinhole_camera_info(msg.width, msg.height, header, hfov_deg=self.options.hfov_deg)
        self.info_pub.publish(info)
        if self.depth_pub is not None:  # registered to the image: same header, same K
            self.depth_pub.publish(depth_to_msg(floor_depth(msg.width, msg.height, info.k), header))
            self.depth_info_pub.publish(info)
        if self.compressed_pub is not None:
            self.compressed_pub.publish(
                frame_to_compressed(
                    rgb, header, encoding=self.options.encoding, quality=self.options.jpeg_quality
                )
            )
        self._last_published_ns = _stamp_ns(header)
        if len(self._recent_stamps) == self._recent_stamps.maxlen:
            self._recent_set.discard(self._recent_stamps[0])
        self._recent_stamps.append(self._last_published_ns)
        self._recent_set.add(self._last_published_ns)
        self.stats.frame_published()
        return header

    def _publishing_done(self, now: float, reason: str) -> None:
        self._publishing_done_at = now
        self.finish_reason = reason
        self._check_linger(now)

    def _check_linger(self, now: float) -> None:
        """After the last frame: stop once its output is in, or after ``linger`` seconds."""
        assert self._publishing_done_at is not None
        last_done = (
            self._last_published_ns is not None and self._last_output_ns >= self._last_published_ns
        )
        if last_done or now - self._publishing_done_at >= self.options.linger:
            self._finish(self.finish_reason)

    def _finish(self, reason: str) -> None:
        if not self.finished:
            self.finished = True
            self.finish_reason = reason
            self._publish_timer.cancel()
            self._limit_timer.cancel()

    # --- monitoring ------------------------------------------------------------------------

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.get_logger().warning(text)

    def _on_labels(self, msg: Image) -> None:
        now_ns = self.get_clock().now().nanoseconds
        stamp_ns = _stamp_ns(msg.header)
        latency = (now_ns - stamp_ns) / 1e9 if stamp_ns > 0 else None
        if latency is None:
            self._warn_once(
                "stamp", f"{self.labels_topic} arrives with a zero stamp: no latency measured"
            )
        ours = stamp_ns <= 0 or stamp_ns in self._recent_set
        if ours:
            self._last_output_ns = max(self._last_output_ns, stamp_ns)
        else:
            self._warn_once(
                "foreign",
                f"{self.labels_topic} carries results for frames this camera did not publish: "
                f"another camera publishes to the node, or another program uses "
                f"ROS_DOMAIN_ID={self._domain_id()} (export a domain id of your own)",
            )
        labels = None
        try:
            labels = msg_to_array(msg)
        except ImageDecodeError as exc:
            self._warn_once("labels", f"cannot decode {self.labels_topic}: {exc}")
        self.stats.output_received(self._monotonic(), latency, labels, ours=ours, stamp_ns=stamp_ns)
        if self._publishing_done_at is not None and not self.finished:
            self._check_linger(self._monotonic())

    def _on_points(self, msg: PointCloud2) -> None:
        z = np.frombuffer(bytes(msg.data), dtype=np.uint8)
        count = msg.width * msg.height
        if count and msg.point_step >= 12 and len(z) >= count * msg.point_step:
            z = z[: count * msg.point_step].reshape(count, msg.point_step)[:, 8:12]
            self.points_valid = float(np.isfinite(z.copy().view("<f4")).mean())
        self.points_received += 1

    def _on_overlay(self, msg: Image) -> None:
        saved = False
        if self.writer is not None and not self._write_failed:
            try:
                rgb = image_to_rgb(msg)
                saved = self.writer.write(self.stats.overlays + 1, rgb) is not None
            except ImageDecodeError as exc:
                self._warn_once("overlay", f"cannot decode {self.overlay_topic}: {exc}")
            except OSError as exc:
                self._write_failed = True
                self.get_logger().error(f"{exc}; overlays are no longer saved")
        self.stats.overlay_received(saved)

    def _on_vocabulary(self, msg: String) -> None:
        error = self.stats.vocabulary_received(msg.data)
        if error is not None:
            self.get_logger().warning(f"{self.vocabulary_topic}: {error}")

    def _on_incompatible_subscription(self, topic: str, event: Any) -> None:
        policy = getattr(getattr(event, "last_policy_kind", None), "name", "?")
        self._warn_once(
            f"qos {topic}",
            f"a publisher of {topic} offers a QoS incompatible with this monitor (policy "
            f"{policy}); the monitor subscribes reliable (output.qos of the node must not be "
            f"sensor_data)",
        )

    def _on_incompatible_publisher(self, event: Any) -> None:
        policy = getattr(getattr(event, "last_policy_kind", None), "name", "?")
        self._warn_once(
            "qos image",
            f"a subscriber of {self.image_pub.topic_name} requests a QoS this camera does not "
            f"offer (policy {policy}); try --qos reliable",
        )

    def _domain_id(self) -> str:
        try:
            return str(self.context.get_domain_id())
        except Exception:  # older rclpy, or a context already shut down
            return os.environ.get("ROS_DOMAIN_ID", "0")

    def _report(self) -> None:
        topic = self.image_pub.topic_name
        if self.count_publishers(topic) > 1:
            self._warn_once(
                "publishers",
                f"{topic} has another publisher besides this camera; the node's outputs mix "
                f"both (ROS_DOMAIN_ID={self._domain_id()})",
            )
        detail = ""
        if self.stats.outputs == 0:
            detail = (
                f"{self.image_pub.topic_name}: {self.image_pub.get_subscription_count()} "
                f"subscribers, {self.labels_topic}: {self.count_publishers(self.labels_topic)} "
                f"publishers"
            )
        if self.depth_pub is not None and self.stats.outputs:
            detail = f"points {self.points_received} ({self.points_valid:.0%} valid)"
        self._printer(self.stats.report(self._monotonic(), detail))


# --- environment and command line ----------------------------------------------------------

_OLD_DISTROS = ("foxy", "galactic", "humble")


def find_fastdds_profile() -> Path | None:
    """config/fastdds.xml of this package: installed share folder, or the source tree."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("ovseg_ros")) / "config")
    except Exception:  # not installed through ament, or ament_index_python missing
        pass
    candidates.append(Path(sys.prefix) / "share" / "ovseg_ros" / "config")
    candidates.append(Path(__file__).resolve().parents[2] / "config")
    for folder in candidates:
        if (folder / "fastdds.xml").is_file():
            return folder / "fastdds.xml"
    return None


def configure_environment(env: MutableMapping[str, str] | None = None) -> list[str]:
    """Keep DDS discovery on this host unless the user chose otherwise; use the Fast DDS profile.

    Sets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST (plus ROS_LOCALHOST_ONLY=1 when ROS_DISTRO is
    Humble or older) when neither variable is set, and FASTDDS_DEFAULT_PROFILES_FILE to the
    package's config/fastdds.xml (large shared-memory segment for camera frames) when it is unset
    and the RMW is Fast DDS. Must run before rclpy.init. Returns notes for the user.
    """
    env = os.environ if env is None else env
    notes = []
    if not env.get("ROS_AUTOMATIC_DISCOVERY_RANGE") and not env.get("ROS_LOCALHOST_ONLY"):
        env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        if env.get("ROS_DISTRO", "").lower() in _OLD_DISTROS:
            env["ROS_LOCALHOST_ONLY"] = "1"
        notes.append(
            "ROS_AUTOMATIC_DISCOVERY_RANGE was unset: using LOCALHOST (DDS stays on this host; "
            "export it, e.g. SUBNET, to talk to other machines)"
        )
    rmw = env.get("RMW_IMPLEMENTATION", "") or "rmw_fastrtps_cpp"
    if not env.get("FASTDDS_DEFAULT_PROFILES_FILE") and "fastrtps" in rmw:
        profile = find_fastdds_profile()
        if profile is not None:
            env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)
            notes.append(f"FASTDDS_DEFAULT_PROFILES_FILE was unset: using {profile}")
    return notes


def _size_arg(text: str) -> tuple[int, int] | None:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "A stand-in camera for the ovseg node: publishes frames on 'image' (and "
            "'camera_info', optionally 'image/compressed') and prints, once per second, what "
            "comes back from the node: rates, end-to-end latency and the classes it sees."
        ),
        epilog=(
            "environment:\n"
            "  ROS_AUTOMATIC_DISCOVERY_RANGE  set to LOCALHOST when unset (and ROS_LOCALHOST_ONLY\n"
            "                                 is unset too), so DDS traffic stays on this host;\n"
            "                                 export your own (e.g. SUBNET) on a robot\n"
            "  FASTDDS_DEFAULT_PROFILES_FILE  set to the package's config/fastdds.xml when unset\n"
            "                                 (camera-sized best-effort frames over shared\n"
            "                                 memory); give the node the same profile\n"
            "  ROS arguments go after --ros-args, e.g. --ros-args -r image:=/cam/image\n"
            "\n"
            "example: sample_camera --rate 2 --duration 30 --require-output"
        ),
    )
    src = parser.add_argument_group("source (default: the sample photos of skimage.data)")
    kind = src.add_mutually_exclusive_group()
    kind.add_argument("--folder", metavar="DIR", help="publish the images of DIR, sorted by name")
    kind.add_argument("--video", metavar="FILE", help="publish the frames of a video file")
    kind.add_argument(
        "--webcam", metavar="INDEX", type=_int_at_least(0), help="publish a cv2.VideoCapture device"
    )
    src.add_argument(
        "--once", action="store_true", help="stop at the end of the photos/folder/video (no loop)"
    )
    pub = parser.add_argument_group("publishing")
    pub.add_argument("--rate", type=_positive_float, default=2.0, help="frames per second [2.0]")
    pub.add_argument(
        "--size",
        type=_size_arg,
        default=DEFAULT_SIZE,
        metavar="WxH",
        help="frame size: resize keeping the aspect, then centre-crop; 'native' keeps each "
        "frame's own size [640x480]",
    )
    pub.add_argument("--encoding", choices=ENCODINGS, default="rgb8", help="[rgb8]")
    pub.add_argument(
        "--compressed", action="store_true", help="also publish image/compressed (JPEG)"
    )
    pub.add_argument(
        "--jpeg-quality",
        type=_int_at_least(1),
        default=90,
        metavar="Q",
        help="JPEG quality of image/compressed, 1-100 [90]",
    )
    pub.add_argument(
        "--qos",
        choices=("sensor_data", "reliable"),
        default="sensor_data",
        help="sensor_data: best effort, keep last 1, like camera drivers; reliable [sensor_data]",
    )
    pub.add_argument("--frame-id", default="camera", help="header frame_id [camera]")
    pub.add_argument(
        "--depth",
        action="store_true",
        help="also publish 'depth' (16UC1 millimetres, registered to the image: a floor 1 m "
        "below the camera, which looks 30 degrees down) and 'depth/camera_info', and watch the "
        "node's ~/points (run the node with depth.enabled: true)",
    )
    pub.add_argument(
        "--hfov",
        type=_positive_float,
        default=60.0,
        metavar="DEG",
        help="horizontal field of view of the camera_info pinhole model [60]",
    )
    mon = parser.add_argument_group("monitor")
    mon.add_argument(
        "--node", default="/ovseg", help="the segmentation node whose outputs to watch [/ovseg]"
    )
    mon.add_argument(
        "--out",
        default="out/stream",
        metavar="DIR",
        help="save received overlays here as PNG, plus latest_overlay.png; '' disables "
        "[out/stream]",
    )
    mon.add_argument(
        "--save-every",
        type=_int_at_least(1),
        default=1,
        metavar="N",
        help="keep every N-th overlay (latest_overlay.png is always refreshed) [1]",
    )
    stop = parser.add_argument_group("stopping (default: run until Ctrl-C)")
    stop.add_argument("--duration", type=_positive_float, metavar="S", help="stop after S seconds")
    stop.add_argument(
        "--frames", type=_int_at_least(1), metavar="N", help="stop after N published frames"
    )
    stop.add_argument(
        "--linger",
        type=_non_negative_float,
        default=3.0,
        metavar="S",
        help="after the last frame (--frames, --once), wait up to S seconds for its output [3]",
    )
    stop.add_argument(
        "--require-output",
        action="store_true",
        help="exit 1 when no output came back from the node (for scripted demos)",
    )
    return parser


def open_source(args: argparse.Namespace) -> FrameSource:
    """The FrameSource the arguments ask for (SourceError when it cannot be opened)."""
    loop = not args.once
    if args.folder is not None:
        return FrameSource.folder(args.folder, args.size, loop)
    if args.video is not None:
        return FrameSource.video(args.video, args.size, loop)
    if args.webcam is not None:
        return FrameSource.webcam(args.webcam, args.size)
    return FrameSource.samples(args.size, loop)


def _cleanup(node: Node | None, executor: Any, context: Context) -> None:
    for step in (
        (lambda: executor.shutdown(timeout_sec=1.0)) if executor is not None else None,
        node.destroy_node if node is not None else None,
        context.try_shutdown,
    ):
        if step is None:
            continue
        try:
            step()
        except (Exception, KeyboardInterrupt):  # already shut down by a signal: nothing to do
            pass


class StopSignals:
    """Turns SIGINT / SIGTERM into a flag the spin loop checks (a second SIGINT raises
    KeyboardInterrupt). A signal ignored at start (nohup, background jobs) stays ignored; the
    previous handlers come back on exit. Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self.received: str | None = None
        #: False once the loop is left: further signals are only recorded (clean shutdown).
        self.hurry = True
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT and self.hurry:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous = signal.getsignal(sig)
                if previous is signal.SIG_IGN:
                    continue
                signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main thread
                continue
            self._previous[sig] = previous
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, previous in self._previous.items():
            try:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            except (ValueError, OSError):
                pass
        self._previous.clear()


def _init_rclpy(args: list[str], context: Context) -> None:
    """rclpy.init without rclpy's own signal handlers (StopSignals stops the loop instead)."""
    try:
        from rclpy.signals import SignalHandlerOptions

        rclpy.init(args=args, context=context, signal_handler_options=SignalHandlerOptions.NO)
    except (ImportError, TypeError):  # pragma: no cover - releases without the option
        rclpy.init(args=args, context=context)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sample camera; 0 on success, 1 with --require-output and no output, 2 on errors."""
    from rclpy.utilities import remove_ros_args

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(remove_ros_args(args=argv))

    def say(text: str) -> None:
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)

    if args.encoding.startswith("yuv") and not hasattr(cv2, "COLOR_RGB2YUV_UYVY"):
        say(f"error: encoding {args.encoding} needs OpenCV 4.7 or newer")
        return 2
    for note in configure_environment():
        say(note)
    try:
        source = open_source(args)
    except SourceError as exc:
        say(f"error: {exc}")
        return 2
    options = CameraOptions(
        rate=args.rate,
        encoding=args.encoding,
        compressed=args.compressed,
        jpeg_quality=args.jpeg_quality,
        qos=args.qos,
        frame_id=args.frame_id,
        hfov_deg=args.hfov,
        monitor_node=args.node,
        out_dir=args.out,
        save_every=args.save_every,
        max_frames=args.frames or 0,
        duration=args.duration or 0.0,
        linger=args.linger,
        depth=args.depth,
    )
    with StopSignals() as stop:
        return _run(args, [PROG, *argv], source, options, stop, say)


def _run(
    args: argparse.Namespace,
    ros_argv: list[str],
    source: FrameSource,
    options: CameraOptions,
    stop: StopSignals,
    say: Callable[[str], None],
) -> int:
    """main() once the source is open: init rclpy, spin until done, clean up, summarise."""
    context = Context()
    node: SampleCameraNode | None = None
    executor = None
    interrupted = None
    try:
        _init_rclpy(ros_argv, context)
        try:
            node = SampleCameraNode(source, options, context=context)
        except SourceError as exc:  # the output folder
            say(f"error: {exc}")
            return 2
        say(
            f"publishing {source.describe()} on {node.image_pub.topic_name} at "
            f"{options.rate:g} Hz ({options.encoding}, {options.qos}); watching "
            f"{node.labels_topic}" + (f"; overlays -> {options.out_dir}" if options.out_dir else "")
        )
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        while not node.finished and stop.received is None and context.ok():
            executor.spin_once(timeout_sec=0.1)
        interrupted = stop.received
    except KeyboardInterrupt:
        interrupted = "SIGINT"
    except ExternalShutdownException:
        interrupted = "shutdown"
    finally:
        stop.hurry = False  # from here on a signal is only recorded: the shutdown stays clean
        try:
            source.close()
            _cleanup(node, executor, context)
        except KeyboardInterrupt:  # the signal came just before `hurry` was cleared
            pass
    if node is None:
        return 0 if interrupted else 2
    if interrupted or not node.finished:
        reason = f"interrupted by {interrupted}" if interrupted else "context shut down"
    else:
        reason = node.finish_reason
    say(f"stopped ({reason}): {node.stats.summary()}")
    if node.error is not None:
        say(f"error: {node.error}")
        return 2
    if args.require_output and node.stats.outputs == 0:
        say(f"error: no output arrived on {node.labels_topic} (is the node running?)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
