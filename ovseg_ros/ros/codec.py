"""Conversions between sensor_msgs Image / CompressedImage messages and numpy arrays.

Only the message classes are used here, never an rclpy node, so everything is testable without
rclpy.init(). Inputs are decoded to HxWx3 uint8 RGB, the one format the engine takes; outputs
(labels, confidence, masks, overlay) are encoded as mono8 / mono16 / rgb8 with is_bigendian 0 and
no row padding.

Encoding names follow sensor_msgs/image_encodings.hpp: ``yuv422`` is UYVY (bytes U0 Y0 V0 Y1,
newer name ``uyvy``) and ``yuv422_yuy2`` is YUYV (Y0 U0 Y1 V0, newer name ``yuyv``). The generic
OpenCV types ``8UC1`` and ``16UC1`` are read as mono8 / mono16, and ``8UC3`` as bgr8 (the channel
order of images that OpenCV produces and cv_bridge publishes with ``passthrough``).

cv_bridge (ROS 2) is optional: ``image_to_rgb(msg, use_cv_bridge=True)`` uses it for the
encodings where it gives exactly the same result, and the numpy path otherwise. The numpy path is
the default and the tested one; it honours ``step`` (row padding) and ``is_bigendian``.
"""

from __future__ import annotations

import array
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

__all__ = [
    "SUPPORTED_COMPRESSED_FORMATS",
    "SUPPORTED_ENCODINGS",
    "ImageDecodeError",
    "compressed_to_rgb",
    "cv_bridge_available",
    "header_copy",
    "image_to_rgb",
    "labels_to_msg",
    "mono8_to_msg",
    "msg_to_array",
    "rgb_to_msg",
]


class ImageDecodeError(ValueError):
    """An image message that cannot be turned into an RGB array; the message says why."""


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
    "8UC1",
    "8UC3",
    "16UC1",
)

#: Codecs compressed_to_rgb accepts in CompressedImage.format (an empty format is sniffed).
SUPPORTED_COMPRESSED_FORMATS: tuple[str, ...] = ("jpeg", "png")

# Pixel layout of each encoding: (bytes per pixel, how to turn the rows into RGB).
_LAYOUT: dict[str, tuple[int, str]] = {
    "rgb8": (3, "rgb"),
    "bgr8": (3, "bgr"),
    "8UC3": (3, "bgr"),
    "rgba8": (4, "rgba"),
    "bgra8": (4, "bgra"),
    "mono8": (1, "gray"),
    "8UC1": (1, "gray"),
    "mono16": (2, "gray16"),
    "16UC1": (2, "gray16"),
    "yuv422": (2, "uyvy"),
    "uyvy": (2, "uyvy"),
    "yuv422_yuy2": (2, "yuyv"),
    "yuyv": (2, "yuyv"),
}
# Case-insensitive lookup ("RGB8", "8uc3" and the like come from hand-written publishers).
_CANONICAL: dict[str, str] = {name.lower(): name for name in _LAYOUT}

_CVT_CODE: dict[str, int] = {
    "bgr": cv2.COLOR_BGR2RGB,
    "rgba": cv2.COLOR_RGBA2RGB,
    "bgra": cv2.COLOR_BGRA2RGB,
    "gray": cv2.COLOR_GRAY2RGB,
    "uyvy": cv2.COLOR_YUV2RGB_UYVY,
    "yuyv": cv2.COLOR_YUV2RGB_YUYV,
}

# Encodings where ROS 2 cv_bridge's imgmsg_to_cv2(msg, "rgb8") gives exactly the numpy path's
# result. Not mono16 (cv_bridge scales by 255/65535 with rounding, not >> 8), not 8UC1 / 8UC3 /
# 16UC1 (cv_bridge refuses to colour-convert generic types), not the uyvy / yuyv aliases (older
# cv_bridge releases do not know them).
_CV_BRIDGE_ENCODINGS = frozenset(
    {"rgb8", "bgr8", "rgba8", "bgra8", "mono8", "yuv422", "yuv422_yuy2"}
)


# --- decoding ------------------------------------------------------------------------------


def _supported_list() -> str:
    return ", ".join(SUPPORTED_ENCODINGS)


def _buffer(data: Any) -> np.ndarray:
    """The message's data as a flat uint8 array, without a copy when it exposes a buffer."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if isinstance(data, list | tuple):
        # Slow path (a hand-built message); rclpy itself gives array.array('B') or bytes.
        try:
            return np.asarray(data, dtype=np.uint8)
        except (OverflowError, ValueError, TypeError) as exc:
            raise ImageDecodeError(f"image data is not a sequence of bytes 0-255: {exc}") from exc
    try:
        # bytes, bytearray, array.array, memoryview: a zero-copy view of the raw bytes.
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(
            f"image data of type {type(data).__name__} is not a byte buffer: {exc}"
        ) from exc


def _rows(data: Any, height: int, width: int, step: int, bpp: int, encoding: str) -> np.ndarray:
    """Check the geometry and return the pixel bytes as a height x (width * bpp) uint8 view."""
    if width <= 0 or height <= 0:
        raise ImageDecodeError(
            f"empty image: width {width} x height {height} (encoding '{encoding}')"
        )
    row_bytes = width * bpp
    if step < row_bytes:
        raise ImageDecodeError(
            f"row step {step} bytes is smaller than width {width} x {bpp} bytes per pixel = "
            f"{row_bytes} bytes (encoding '{encoding}')"
        )
    buf = _buffer(data)
    needed = step * height
    if buf.size < needed:
        raise ImageDecodeError(
            f"image data has {buf.size} bytes but step {step} x height {height} needs {needed} "
            f"(encoding '{encoding}', {width}x{height})"
        )
    # Extra bytes after step * height are ignored, as cv_bridge does.
    return buf[:needed].reshape(height, step)[:, :row_bytes]


def _canonical_encoding(encoding: str) -> str:
    name = _CANONICAL.get(encoding.strip().lower())
    if name is None:
        raise ImageDecodeError(
            f"unsupported image encoding '{encoding}'; supported: {_supported_list()}"
        )
    return name


def image_to_rgb(msg: Image, *, use_cv_bridge: bool = False) -> np.ndarray:
    """Decode a sensor_msgs/Image to a C-contiguous HxWx3 uint8 RGB array.

    16-bit data (mono16, 16UC1) is reduced to 8 bits by keeping the high byte (``>> 8``),
    honouring ``is_bigendian``, because the engine takes 8-bit RGB. Row padding (``step`` larger
    than width x bytes per pixel) is skipped. For rgb8 without padding the result is a view
    sharing memory with ``msg.data`` (no copy; writable when the data is, as rclpy's
    array.array is); every other case returns a new array.
    With ``use_cv_bridge`` and cv_bridge importable, the encodings where cv_bridge gives the same
    result are converted by cv_bridge. Raises ImageDecodeError for anything malformed.
    """
    encoding = _canonical_encoding(msg.encoding)
    bpp, kind = _LAYOUT[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    rows = _rows(msg.data, height, width, step, bpp, encoding)
    if kind in ("uyvy", "yuyv") and width % 2:
        raise ImageDecodeError(
            f"encoding '{encoding}' (YUV 4:2:2, two pixels share U and V) needs an even width, "
            f"got {width}"
        )
    if use_cv_bridge and encoding in _CV_BRIDGE_ENCODINGS and step % bpp == 0:
        bridge = _cv_bridge()
        if bridge is not None:
            try:
                return np.ascontiguousarray(bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
            except Exception:  # CvBridgeError and friends: the numpy path decides and explains
                pass

    if kind == "rgb":
        rgb = rows.reshape(height, width, 3)
        # Without padding this is a view of msg.data: no copy at all.
        return np.ascontiguousarray(rgb)
    if kind == "gray16":
        # The high byte of each 16-bit sample: first in big-endian data, second in little-endian.
        high = rows[:, 0::2] if msg.is_bigendian else rows[:, 1::2]
        return cv2.cvtColor(high, cv2.COLOR_GRAY2RGB)
    if kind == "gray":
        return cv2.cvtColor(rows, cv2.COLOR_GRAY2RGB)
    pixels = rows.reshape(height, width, bpp)  # a strided view when rows are padded
    return np.ascontiguousarray(cv2.cvtColor(pixels, _CVT_CODE[kind]))


def _compressed_codec(fmt: str) -> str:
    """The codec named in CompressedImage.format ('' when the format string names none)."""
    text = fmt.strip().lower()
    if "compresseddepth" in text:
        raise ImageDecodeError(
            f"compressed format '{fmt}' is a compressedDepth stream (depth images); supported: "
            f"{', '.join(SUPPORTED_COMPRESSED_FORMATS)}"
        )
    # "jpeg", "png", or image_transport's "<encoding>; jpeg compressed <encoding>".
    codec_part = text.split(";", 1)[1] if ";" in text else text
    words = codec_part.replace(",", " ").split()
    for word in words:
        if word in ("jpeg", "jpg"):
            return "jpeg"
        if word == "png":
            return "png"
    if not words:
        return ""
    raise ImageDecodeError(
        f"unsupported compressed format '{fmt}'; supported: "
        f"{', '.join(SUPPORTED_COMPRESSED_FORMATS)}"
    )


_IGNORE_ORIENTATION = getattr(cv2, "IMREAD_IGNORE_ORIENTATION", 0)
_IMREAD_BGR = cv2.IMREAD_COLOR | _IGNORE_ORIENTATION
# OpenCV >= 4.10 decodes straight to RGB (one pass less); older versions decode BGR and swap.
_IMREAD_RGB = (
    cv2.IMREAD_COLOR_RGB | _IGNORE_ORIENTATION if hasattr(cv2, "IMREAD_COLOR_RGB") else None
)


def compressed_to_rgb(msg: CompressedImage) -> np.ndarray:
    """Decode a jpeg or png sensor_msgs/CompressedImage to a C-contiguous HxWx3 uint8 RGB array.

    Alpha is dropped, gray images are replicated to three channels and 16-bit PNGs are reduced to
    8 bits. EXIF orientation is ignored so the pixel grid matches the camera's. Raises
    ImageDecodeError for empty, corrupt or unsupported data.
    """
    codec = _compressed_codec(msg.format)
    buf = _buffer(msg.data)
    label = f"'{msg.format}'" if msg.format else "(no format given)"
    if buf.size == 0:
        raise ImageDecodeError(f"compressed image {label} has no data")
    try:
        if _IMREAD_RGB is not None:
            rgb = cv2.imdecode(buf, _IMREAD_RGB)
        else:
            image = cv2.imdecode(buf, _IMREAD_BGR)
            rgb = None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    except cv2.error as exc:  # some decoders raise instead of returning None
        rgb, error = None, f": {str(exc).strip()}"
    else:
        error = ""
    if rgb is None:
        what = f"{codec} " if codec else ""
        raise ImageDecodeError(
            f"compressed image {label} ({buf.size} bytes) is not valid {what}data (corrupt or "
            f"truncated){error}"
        )
    return np.ascontiguousarray(rgb)


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


# --- encoding ------------------------------------------------------------------------------


def header_copy(header: Header | None) -> Header:
    """A new Header with the stamp and frame_id of ``header`` (an empty one for None)."""
    if header is None:
        return Header()
    stamp = Time(sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec))
    return Header(stamp=stamp, frame_id=str(header.frame_id))


def _to_data(array_: np.ndarray) -> array.array:
    """The array's bytes as the array.array('B') that Image.data stores.

    Measured for a 1920x1080x3 uint8 array (6.2 MB) with the Kilted wheels, median of 200:
    ``a = array.array('B'); a.frombytes(arr); msg.data = a`` 0.44 ms (0.20 ms with
    ROS_PYTHON_CHECK_FIELDS=1, when the setter keeps the array as is); ``msg.data =
    arr.tobytes()`` 0.46 ms but 410 ms with ROS_PYTHON_CHECK_FIELDS=1 (the setter range-checks
    every byte in Python); ``msg.data = array.array('B', arr.tobytes())`` 5.8 ms;
    ``msg.data = memoryview(arr).cast('B')`` 220 ms (copied element by element).
    """
    flat = np.ascontiguousarray(array_).reshape(-1).view(np.uint8)
    out = array.array("B")
    out.frombytes(flat)
    return out


def _new_image(
    pixels: np.ndarray, encoding: str, header: Header | None, bytes_per_pixel: int
) -> Image:
    msg = Image()
    msg.header = header_copy(header)
    msg.height = int(pixels.shape[0])
    msg.width = int(pixels.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * bytes_per_pixel
    # Assigned after construction: Image(data=...) copies the buffer once more in __init__.
    msg.data = _to_data(pixels)
    return msg


def _check_2d(array_: np.ndarray, what: str) -> None:
    if not isinstance(array_, np.ndarray) or array_.ndim != 2:
        shape = getattr(array_, "shape", type(array_).__name__)
        raise ValueError(f"{what} must be a 2-D (height x width) array, got {shape}")
    if array_.shape[0] == 0 or array_.shape[1] == 0:
        raise ValueError(f"{what} is empty: {array_.shape}")


def labels_to_msg(labels: np.ndarray, header: Header | None) -> Image:
    """Encode an HxW label map as mono8 (uint8) or mono16 (uint16, little-endian) Image."""
    _check_2d(labels, "labels")
    if labels.dtype == np.uint8:
        return _new_image(labels, "mono8", header, 1)
    if labels.dtype == np.uint16:
        return _new_image(labels.astype("<u2", copy=False), "mono16", header, 2)
    raise ValueError(f"labels must be uint8 or uint16, got {labels.dtype}")


def mono8_to_msg(array_: np.ndarray, header: Header | None) -> Image:
    """Encode an HxW uint8 array (confidence, mask) as a mono8 Image."""
    _check_2d(array_, "mono8 image")
    if array_.dtype != np.uint8:
        raise ValueError(f"mono8 image must be uint8, got {array_.dtype}")
    return _new_image(array_, "mono8", header, 1)


def rgb_to_msg(rgb: np.ndarray, header: Header | None) -> Image:
    """Encode an HxWx3 uint8 RGB array as an rgb8 Image."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", type(rgb).__name__)
        raise ValueError(f"rgb image must be a height x width x 3 array, got {shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"rgb image must be uint8, got {rgb.dtype}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"rgb image is empty: {rgb.shape}")
    return _new_image(rgb, "rgb8", header, 3)


_OUTPUT_LAYOUT: Mapping[str, tuple[int, str]] = {
    "mono8": (1, "u1"),
    "8UC1": (1, "u1"),
    "mono16": (2, "u2"),
    "16UC1": (2, "u2"),
    "rgb8": (3, "u1"),
}


def msg_to_array(msg: Image) -> np.ndarray:
    """Decode a mono8 / mono16 / rgb8 Image to HxW uint8, HxW uint16 or HxWx3 uint8 (a copy)."""
    encoding = _CANONICAL.get(msg.encoding.strip().lower(), msg.encoding)
    if encoding not in _OUTPUT_LAYOUT:
        raise ImageDecodeError(
            f"msg_to_array reads mono8, mono16 and rgb8 images, not '{msg.encoding}'"
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
