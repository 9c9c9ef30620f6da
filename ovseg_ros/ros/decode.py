"""Decoding of sensor_msgs/Image messages to numpy arrays, and why a message is refused.

Only the message classes are used here, never an rclpy node, so everything is testable without
rclpy.init(). Input frames are decoded to HxWx3 uint8 RGB, the one format the engine takes
(``image_to_rgb``; CompressedImage: ``decode_compressed``); ``msg_to_array`` reads the node's own
outputs back (mono8 / mono16 / rgb8, for monitors and tests).

Input encodings are the ones the node's contract lists (``SUPPORTED_ENCODINGS``), named as in
sensor_msgs/image_encodings.hpp: ``yuv422`` is UYVY (bytes U0 Y0 V0 Y1, newer name ``uyvy``) and
``yuv422_yuy2`` is YUYV (Y0 U0 Y1 V0, newer name ``yuyv``). The generic OpenCV types (``8UC1``,
``8UC3``, ``16UC1``, ``32FC1``...) are rejected with a reason: they say nothing about what the
values mean (``16UC1`` and ``32FC1`` are what depth cameras publish, ``8UC3`` has no channel
order), so a depth image sent by mistake is refused rather than segmented as intensity.

The size limit (``max_pixels``, 0 = none) is checked from width and height before anything is
decoded or allocated. An image over the limit is rejected, or with ``oversize="downscale"``
resized with INTER_AREA.

Every rejection (here and in ``decode_compressed``) raises ImageDecodeError whose ``kind`` is one
of ``REJECTION_KINDS`` (a short, stable identifier to count by) and whose message is one
sentence, echoing at most ``_ECHO_LIMIT`` characters of any string taken from the message.

cv_bridge (ROS 2) is optional: ``image_to_rgb(msg, use_cv_bridge=True)`` uses it for the
encodings where it gives exactly the same result, and the numpy path otherwise. The numpy path is
the default and the tested one; it honours ``step`` (row padding) and ``is_bigendian``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
from sensor_msgs.msg import Image

__all__ = [
    "OVERSIZE_MODES",
    "REJECTION_KINDS",
    "SUPPORTED_ENCODINGS",
    "ImageDecodeError",
    "cv_bridge_available",
    "image_to_rgb",
    "msg_to_array",
]

#: Why an input frame was rejected: ImageDecodeError.kind is always one of these keys. The set is
#: closed and the names are stable, so counters keyed by them stay comparable across releases.
REJECTION_KINDS: Mapping[str, str] = {
    "unsupported_encoding": "Image.encoding is not one the node reads (generic types included)",
    "empty": "Image width or height is zero",
    "bad_geometry": "Image step is smaller than width x bytes per pixel",
    "odd_width": "a YUV 4:2:2 Image (two pixels share U and V) has an odd width",
    "bad_data_type": "the data field is not a byte buffer or a sequence of values 0-255",
    "short_data": "Image data is shorter than step x height",
    "no_data": "a CompressedImage has no data bytes",
    "unsupported_format": "a CompressedImage is neither jpeg nor png (by format field or bytes)",
    "corrupt": "compressed data with no jpeg / png signature, a bad or cut header, or undecodable",
    "oversize": "more pixels than max_pixels (or OpenCV's limit) allow, and not downscalable",
}

#: What image_to_rgb / compressed_to_rgb do with an image over max_pixels.
OVERSIZE_MODES: tuple[str, ...] = ("reject", "downscale")


class ImageDecodeError(ValueError):
    """An image message that cannot become an RGB array: ``kind`` classifies, str() says why."""

    def __init__(self, message: str, *, kind: str) -> None:
        if kind not in REJECTION_KINDS:
            # A programming error in this module, never the sender's: fail loudly in the tests.
            raise ValueError(
                f"unknown rejection kind {kind!r}; known: {', '.join(REJECTION_KINDS)}"
            )
        super().__init__(message)
        self.kind = kind


#: Input encodings image_to_rgb accepts, as spelled in sensor_msgs/image_encodings.hpp.
SUPPORTED_ENCODINGS: tuple[str, ...] = (
    "rgb8",
    "bgr8",
    "rgba8",
    "bgra8",
    "mono8",
    "mono16",
    "yuv422",
    "uyvy",
    "yuv422_yuy2",
    "yuyv",
)

# Pixel layout of each encoding: (bytes per pixel, how to turn the rows into RGB).
_LAYOUT: dict[str, tuple[int, str]] = {
    "rgb8": (3, "rgb"),
    "bgr8": (3, "bgr"),
    "rgba8": (4, "rgba"),
    "bgra8": (4, "bgra"),
    "mono8": (1, "gray"),
    "mono16": (2, "gray16"),
    "yuv422": (2, "uyvy"),
    "uyvy": (2, "uyvy"),
    "yuv422_yuy2": (2, "yuyv"),
    "yuyv": (2, "yuyv"),
}
# Case-insensitive lookup ("RGB8", "Mono8" and the like come from hand-written publishers).
_CANONICAL: dict[str, str] = {name.lower(): name for name in _LAYOUT}

# The generic OpenCV types (CV_8UC3, CV_16UC1, CV_32FC1...) as sensor_msgs spells them.
_GENERIC_TYPE = re.compile(r"(8|16|32|64)[usf]c\d+", re.IGNORECASE)
# Why the common generic types are refused, and what to publish instead.
_GENERIC_HINT: dict[str, str] = {
    "16uc1": "a generic 16-bit type, usually a depth image; publish mono16 for 16-bit intensity",
    "32fc1": "a generic float type, usually a depth image, not an intensity image",
    "8uc1": "a generic type with no defined meaning (mask, label or intensity); publish mono8",
    "8uc3": "a generic type with no defined channel order; publish bgr8 or rgb8",
    "8uc4": "a generic type with no defined channel order; publish bgra8 or rgba8",
}

_CVT_CODE: dict[str, int] = {
    "bgr": cv2.COLOR_BGR2RGB,
    "rgba": cv2.COLOR_RGBA2RGB,
    "bgra": cv2.COLOR_BGRA2RGB,
    "gray": cv2.COLOR_GRAY2RGB,
    "uyvy": cv2.COLOR_YUV2RGB_UYVY,
    "yuyv": cv2.COLOR_YUV2RGB_YUYV,
}

# Encodings where ROS 2 cv_bridge's imgmsg_to_cv2(msg, "rgb8") gives exactly the numpy path's
# result. Not mono16 (cv_bridge scales by 255/65535 with rounding, not >> 8), not the uyvy / yuyv
# aliases (older cv_bridge releases do not know them).
_CV_BRIDGE_ENCODINGS = frozenset(
    {"rgb8", "bgr8", "rgba8", "bgra8", "mono8", "yuv422", "yuv422_yuy2"}
)

# At most this many characters of a sender's string (encoding, format) go into a message: a
# 200 KB encoding must not come back as a 200 KB log line or diagnostics entry.
_ECHO_LIMIT = 60


# --- decoding ------------------------------------------------------------------------------


def _quote(text: Any) -> str:
    """A sender's string for a message: quoted, control characters escaped, at most _ECHO_LIMIT."""
    text = str(text)
    shown = repr(text[:_ECHO_LIMIT])[1:-1][:_ECHO_LIMIT]
    if len(text) > _ECHO_LIMIT:
        return f"'{shown}...' ({len(text)} characters)"
    return f"'{shown}'"


def _supported_list() -> str:
    return ", ".join(SUPPORTED_ENCODINGS)


def _check_size_options(max_pixels: int, oversize: str) -> None:
    """Refuse bad max_pixels / oversize arguments: the caller's bug, so not ImageDecodeError."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int | np.integer):
        raise TypeError(f"max_pixels must be an int, got {type(max_pixels).__name__}")
    if max_pixels < 0:
        raise ValueError(f"max_pixels must be 0 (no limit) or positive, got {max_pixels}")
    if oversize not in OVERSIZE_MODES:
        raise ValueError(f"oversize must be one of {', '.join(OVERSIZE_MODES)}, got {oversize!r}")


def _buffer(data: Any) -> np.ndarray:
    """The message's data as a flat uint8 array, without a copy when it exposes a buffer."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if isinstance(data, list | tuple):
        # Slow path (a hand-built message); rclpy itself gives array.array('B') or bytes. The
        # range is checked here: numpy 1.x wraps 300 to 44 where numpy 2 raises.
        if not data:
            return np.zeros(0, np.uint8)
        try:
            values = np.asarray(data)
        except (OverflowError, ValueError, TypeError) as exc:
            values, error = None, type(exc).__name__
        else:
            error = f"{values.dtype} values" if values.dtype.kind not in "biu" else "out of range"
        if (
            values is None
            or values.ndim != 1
            or values.dtype.kind not in "biu"
            or (values.min() < 0 or values.max() > 255)
        ):
            raise ImageDecodeError(
                f"image data is not a sequence of bytes 0-255 ({error})", kind="bad_data_type"
            )
        return values.astype(np.uint8)
    try:
        # bytes, bytearray, array.array, memoryview: a zero-copy view of the raw bytes.
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(
            f"image data of type {_quote(type(data).__name__)} is not a byte buffer",
            kind="bad_data_type",
        ) from exc


def _check_geometry(height: int, width: int, step: int, bpp: int, encoding: str) -> None:
    """Check the size fields alone (no data touched, so this costs the same for any frame)."""
    if width <= 0 or height <= 0:
        raise ImageDecodeError(
            f"empty image: width {width} x height {height} (encoding '{encoding}')", kind="empty"
        )
    row_bytes = width * bpp  # Python ints: no overflow whatever the sender wrote
    if step < row_bytes:
        raise ImageDecodeError(
            f"row step {step} bytes is smaller than width {width} x {bpp} bytes per pixel = "
            f"{row_bytes} bytes (encoding '{encoding}')",
            kind="bad_geometry",
        )


def _rows(data: Any, height: int, width: int, step: int, bpp: int, encoding: str) -> np.ndarray:
    """Check the geometry and return the pixel bytes as a height x (width * bpp) uint8 view."""
    _check_geometry(height, width, step, bpp, encoding)
    buf = _buffer(data)
    needed = step * height
    if buf.size < needed:
        raise ImageDecodeError(
            f"image data has {buf.size} bytes but step {step} x height {height} needs {needed} "
            f"(encoding '{encoding}', {width}x{height})",
            kind="short_data",
        )
    # Extra bytes after step * height are ignored, as cv_bridge does.
    return buf[:needed].reshape(height, step)[:, : width * bpp]


def _canonical_encoding(encoding: Any) -> str:
    """The encoding as spelled in SUPPORTED_ENCODINGS, or ImageDecodeError saying why not."""
    text = str(encoding)
    key = text.strip().lower()
    name = _CANONICAL.get(key)
    if name is not None:
        return name
    why = ""
    if _GENERIC_TYPE.fullmatch(key):
        why = ": " + _GENERIC_HINT.get(
            key, "a generic OpenCV type that says nothing of its content"
        )
    raise ImageDecodeError(
        f"unsupported image encoding {_quote(text)}{why}; supported: {_supported_list()}",
        kind="unsupported_encoding",
    )


def _fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest (width, height) with the same aspect whose product is at most max_pixels."""
    scale = math.sqrt(max_pixels / (width * height))
    new_w, new_h = max(1, int(width * scale)), max(1, int(height * scale))
    if new_w * new_h > max_pixels:
        # A side clamped to 1 (extreme aspect ratio) or float rounding up by one.
        if new_h == 1:
            new_w = max_pixels
        elif new_w == 1:
            new_h = max_pixels
        while new_w * new_h > max_pixels:
            if new_w >= new_h:
                new_w -= 1
            else:
                new_h -= 1
    return new_w, new_h


def image_to_rgb(
    msg: Image, *, use_cv_bridge: bool = False, max_pixels: int = 0, oversize: str = "reject"
) -> np.ndarray:
    """Decode a sensor_msgs/Image to a C-contiguous HxWx3 uint8 RGB array.

    16-bit data (mono16) is reduced to 8 bits by keeping the high byte (``>> 8``), honouring
    ``is_bigendian``, because the engine takes 8-bit RGB. Row padding (``step`` larger than
    width x bytes per pixel) is skipped. For rgb8 without padding the result is a view sharing
    memory with ``msg.data`` (no copy; writable when the data is, as rclpy's array.array is);
    every other case returns a new array.
    ``max_pixels`` (0 = no limit) is checked against width x height before the data is touched:
    a larger image is rejected (``oversize="reject"``) or resized with INTER_AREA to the largest
    size of the same aspect within the limit (``oversize="downscale"``).
    With ``use_cv_bridge`` and cv_bridge importable, the encodings where cv_bridge gives the same
    result are converted by cv_bridge (not when downscaling). Raises ImageDecodeError (with its
    ``kind``) for anything malformed or too large.
    """
    _check_size_options(max_pixels, oversize)
    encoding = _canonical_encoding(msg.encoding)
    bpp, layout = _LAYOUT[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    _check_geometry(height, width, step, bpp, encoding)
    if layout in ("uyvy", "yuyv") and width % 2:
        raise ImageDecodeError(
            f"encoding '{encoding}' (YUV 4:2:2, two pixels share U and V) needs an even width, "
            f"got {width}",
            kind="odd_width",
        )
    target: tuple[int, int] | None = None
    if max_pixels and width * height > max_pixels:
        if oversize == "reject":
            raise ImageDecodeError(
                f"image {width}x{height} ({width * height} pixels, encoding '{encoding}') is "
                f"larger than max_pixels {max_pixels}",
                kind="oversize",
            )
        target = _fit(width, height, max_pixels)
    rows = _rows(msg.data, height, width, step, bpp, encoding)
    if target is None and use_cv_bridge and encoding in _CV_BRIDGE_ENCODINGS and step % bpp == 0:
        bridge = _cv_bridge()
        if bridge is not None:
            try:
                return np.ascontiguousarray(bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
            except Exception:  # CvBridgeError and friends: the numpy path decides and explains
                pass

    if layout == "gray16":
        # The high byte of each 16-bit sample: first in big-endian data, second in little-endian.
        pixels = rows[:, 0::2] if msg.is_bigendian else rows[:, 1::2]
        layout = "gray"
    elif layout == "gray":
        pixels = rows
    elif layout in ("uyvy", "yuyv"):
        # Packed 4:2:2 cannot be resized as is (Y and U/V alternate), so convert first.
        pixels = cv2.cvtColor(rows.reshape(height, width, 2), _CVT_CODE[layout])
        layout = "rgb"
    else:
        pixels = rows.reshape(height, width, bpp)  # a strided view when rows are padded
    if target is not None:
        # Resized before the colour conversion, so that runs on the small image only.
        pixels = cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)
    if layout == "rgb":
        # rgb8 without padding or resizing is a view of msg.data: no copy at all.
        return np.ascontiguousarray(pixels)
    return np.ascontiguousarray(cv2.cvtColor(pixels, _CVT_CODE[layout]))


# --- cv_bridge -----------------------------------------------------------------------------

_BRIDGE: Any = None
_BRIDGE_CHECKED = False


def _cv_bridge() -> Any:
    """A shared CvBridge instance, or None when ROS 2 cv_bridge is not importable."""
    global _BRIDGE, _BRIDGE_CHECKED
    if not _BRIDGE_CHECKED:
        _BRIDGE_CHECKED = True
        try:
            # The compiled module is what a ROS-built cv_bridge has; the PyPI "cv-bridge" copy
            # of ROS 1 code (wrong 16-bit mappings) is not accepted without it.
            from cv_bridge import CvBridge
            from cv_bridge.boost.cv_bridge_boost import cvtColor2  # noqa: F401

            _BRIDGE = CvBridge()
        except Exception:  # ImportError, or a broken binary module
            _BRIDGE = None
    return _BRIDGE


def cv_bridge_available() -> bool:
    """Whether ROS 2 cv_bridge (with its compiled conversion module) can be imported."""
    return _cv_bridge() is not None


# --- outputs read back ----------------------------------------------------------------------


# What msg_to_array reads: the node's own outputs, and the generic names other tools give the
# same layouts (reading a label image as 16UC1 is harmless, unlike segmenting one).
_OUTPUT_LAYOUT: Mapping[str, tuple[int, str]] = {
    "mono8": (1, "u1"),
    "8UC1": (1, "u1"),
    "mono16": (2, "u2"),
    "16UC1": (2, "u2"),
    "rgb8": (3, "u1"),
}
_OUTPUT_CANONICAL: dict[str, str] = {name.lower(): name for name in _OUTPUT_LAYOUT}


def msg_to_array(msg: Image) -> np.ndarray:
    """Decode a mono8 / mono16 / rgb8 Image to HxW uint8, HxW uint16 or HxWx3 uint8 (a copy)."""
    encoding = _OUTPUT_CANONICAL.get(str(msg.encoding).strip().lower(), "")
    if not encoding:
        raise ImageDecodeError(
            f"msg_to_array reads mono8, mono16 and rgb8 images, not {_quote(msg.encoding)}",
            kind="unsupported_encoding",
        )
    bpp, kind = _OUTPUT_LAYOUT[encoding]
    height, width = int(msg.height), int(msg.width)
    rows = _rows(msg.data, height, width, int(msg.step), bpp, encoding)
    if kind == "u2":
        dtype = np.dtype(">u2" if msg.is_bigendian else "<u2")
        values = np.ascontiguousarray(rows).view(dtype)  # drops padding; aligned for the view
        return values.astype(np.uint16)  # native byte order, always a new array
    if bpp == 3:
        return rows.reshape(height, width, 3).copy()
    return rows.copy()
