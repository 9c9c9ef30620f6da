"""The messages the sample camera publishes, built from HxWx3 uint8 RGB frames.

``frame_to_msg`` (sensor_msgs/Image in any of ``ENCODINGS``), ``frame_to_compressed`` (JPEG, as
image_transport's compressed plugin sends it), ``pinhole_camera_info`` (a distortion-free
CameraInfo) and, for ``--depth``, ``floor_depth`` / ``depth_to_msg`` (a registered 16UC1 depth
image of a flat floor).
"""

from __future__ import annotations

import array
import math
from collections.abc import Sequence

import cv2
import numpy as np
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header

from ..decode import SUPPORTED_ENCODINGS

__all__ = [
    "ENCODINGS",
    "depth_to_msg",
    "floor_depth",
    "frame_to_compressed",
    "frame_to_msg",
    "pinhole_camera_info",
]

#: Encodings the camera can publish: all those the node reads, under their
#: sensor_msgs/image_encodings.hpp names (not the newer aliases uyvy / yuyv of the 4:2:2 ones).
ENCODINGS: tuple[str, ...] = tuple(e for e in SUPPORTED_ENCODINGS if e not in ("uyvy", "yuyv"))


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
