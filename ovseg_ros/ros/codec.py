"""Conversions between sensor_msgs Image / CompressedImage messages and numpy arrays.

Only the message classes are used here, never an rclpy node, so everything is testable without
rclpy.init(). Inputs are decoded to HxWx3 uint8 RGB, the one format the engine takes; outputs
(labels, confidence, masks, overlay) are encoded as mono8 / mono16 / rgb8 with is_bigendian 0 and
no row padding.

Input encodings are the ones the node's contract lists (``SUPPORTED_ENCODINGS``), named as in
sensor_msgs/image_encodings.hpp: ``yuv422`` is UYVY (bytes U0 Y0 V0 Y1, newer name ``uyvy``) and
``yuv422_yuy2`` is YUYV (Y0 U0 Y1 V0, newer name ``yuyv``). The generic OpenCV types (``8UC1``,
``8UC3``, ``16UC1``, ``32FC1``...) are rejected with a reason: they say nothing about what the
values mean (``16UC1`` and ``32FC1`` are what depth cameras publish, ``8UC3`` has no channel
order), so a depth image sent by mistake is refused rather than segmented as intensity.
Compressed images are jpeg or png, recognised by their signature bytes; any other format (BMP,
TIFF, WebP... that OpenCV would also decode) is rejected before the decoder sees it.

Size limits (``max_pixels``, 0 = none) are checked before anything is decoded or allocated: from
width and height for an Image, from the PNG IHDR chunk or the JPEG frame header (SOFn) for a
CompressedImage. An image over the limit is rejected, or with ``oversize="downscale"`` made
smaller: an Image is resized with INTER_AREA, a JPEG is decoded at 1/2, 1/4 or 1/8 scale by
libjpeg. A PNG, a progressive or multi-scan JPEG and a lossless JPEG over the limit are rejected
even then, since their decoders need memory for the full-size image whatever the output size.
OpenCV's own limits (``OPENCV_IO_MAX_IMAGE_PIXELS``, ``..._WIDTH``, ``..._HEIGHT``, read when its
library loads) are checked the same way, so an image OpenCV would refuse is reported as
``oversize`` too.

Every rejection raises ImageDecodeError whose ``kind`` is one of ``REJECTION_KINDS`` (a short,
stable identifier to count by) and whose message is one sentence, echoing at most
``_ECHO_LIMIT`` characters of any string taken from the message.

cv_bridge (ROS 2) is optional: ``image_to_rgb(msg, use_cv_bridge=True)`` uses it for the
encodings where it gives exactly the same result, and the numpy path otherwise. The numpy path is
the default and the tested one; it honours ``step`` (row padding) and ``is_bigendian``.
"""

from __future__ import annotations

import array
import math
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import cv2
import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

__all__ = [
    "OVERSIZE_MODES",
    "REJECTION_KINDS",
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

#: Codecs compressed_to_rgb accepts in CompressedImage.format (an empty format is sniffed).
SUPPORTED_COMPRESSED_FORMATS: tuple[str, ...] = ("jpeg", "png")

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


def _env_size(name: str, default: int) -> int:
    """An OpenCV size setting parsed as OpenCV does (digits, then KB or MB or nothing)."""
    match = re.fullmatch(r"(\d+)(MB|Mb|mb|KB|Kb|kb)?", os.environ.get(name, ""))
    if match is None:
        return default  # unset (or a value OpenCV itself would not accept)
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20}[(match.group(2) or "")[:1].lower()]
    return int(match.group(1)) * scale


# OpenCV reads these once, when its library loads (setting them later has no effect), and refuses
# larger images with an assertion; this module is imported right after cv2, so it sees the same
# values and can reject such images itself, with kind "oversize", before calling the decoder.
_CV_MAX_PIXELS = _env_size("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30)
_CV_MAX_WIDTH = _env_size("OPENCV_IO_MAX_IMAGE_WIDTH", 1 << 20)
_CV_MAX_HEIGHT = _env_size("OPENCV_IO_MAX_IMAGE_HEIGHT", 1 << 20)


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


def _compressed_codec(fmt: Any) -> str:
    """The codec named in CompressedImage.format ('' when the format string names none)."""
    text = str(fmt).strip().lower()
    supported = ", ".join(SUPPORTED_COMPRESSED_FORMATS)
    if "compresseddepth" in text:
        raise ImageDecodeError(
            f"compressed format {_quote(fmt)} is a compressedDepth stream (depth images); "
            f"supported: {supported}",
            kind="unsupported_format",
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
        f"unsupported compressed format {_quote(fmt)}; supported: {supported}",
        kind="unsupported_format",
    )


class _Header(NamedTuple):
    """What a compressed image's header says, read without decoding anything."""

    codec: str  # "jpeg" or "png"
    width: int
    height: int
    # libjpeg can decode it at 1/2, 1/4, 1/8 scale in memory proportional to the output: a
    # sequential DCT JPEG whose first scan holds every component. Progressive and multi-scan
    # JPEGs buffer the coefficients of the whole image (2 bytes per sample) at any scale, and
    # lossless JPEGs cannot be scaled.
    reducible: bool
    what: str  # for messages: "PNG", "baseline JPEG", "progressive JPEG"...


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# OpenCV picks its JPEG decoder by these three bytes (SOI, then the first marker's 0xFF).
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# Formats OpenCV (or a sender) may know that the contract does not list, by leading bytes, to
# tell "unsupported format" from "corrupt" in the rejection kind.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"BM", "BMP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"v/1\x01", "OpenEXR"),
    (b"#?RADIANCE", "Radiance HDR"),
    (b"#?RGBE", "Radiance HDR"),
    (b"\x59\xa6\x6a\x95", "Sun raster"),
)

# JPEG markers (the byte after 0xFF) and the frame types their SOFn announce.
_SOF_NAMES: dict[int, str] = {
    0xC0: "baseline",
    0xC1: "extended sequential",
    0xC2: "progressive",
    0xC3: "lossless",
    0xC5: "hierarchical sequential",
    0xC6: "hierarchical progressive",
    0xC7: "hierarchical lossless",
    0xC9: "arithmetic sequential",
    0xCA: "arithmetic progressive",
    0xCB: "arithmetic lossless",
    0xCD: "arithmetic hierarchical sequential",
    0xCE: "arithmetic hierarchical progressive",
    0xCF: "arithmetic hierarchical lossless",
}
_SOF_MARKERS = frozenset(_SOF_NAMES)  # SOFn, n in 0-15 except 4 (DHT), 8 (JPG), 12 (DAC)
# Sequential DCT frames, the ones libjpeg can scale down while decoding.
_SEQUENTIAL_DCT = frozenset({0xC0, 0xC1, 0xC9})
_SOS, _EOI, _SOI, _SOF55 = 0xDA, 0xD9, 0xD8, 0xF7
# Markers with no length field: TEM and RST0-7 (libjpeg skips them between segments too).
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# Most JPEG headers (tables, EXIF, ICC) fit in the first 64 KB; only read further when not.
_JPEG_PEEK = 1 << 16


def _other_format(head: bytes) -> str:
    """The name of a non-jpeg / non-png image format that ``head`` starts with ('' if none)."""
    for signature, name in _OTHER_SIGNATURES:
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1"):
        return "AVIF/HEIF"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"1234567fF" and head[2:3].isspace():
        return "PNM"
    return ""


class _Truncated(Exception):
    """The JPEG header continues past the bytes scanned so far."""


class _BadHeader(Exception):
    """A compressed image's header is unusable: rejection kind, reason and codec, no context."""

    def __init__(self, kind: str, why: str, codec: str = "") -> None:
        super().__init__(why)
        self.kind = kind
        self.why = why
        self.codec = codec  # "jpeg" / "png" when the signature said so


class _JpegFrame(NamedTuple):
    marker: int  # the SOFn marker byte
    width: int
    height: int
    frame_components: int  # in the frame header
    scan_components: int  # in the first scan; fewer than the frame's means several scans


def _jpeg_frame(data: bytes) -> _JpegFrame:
    """The frame header (SOFn) of JPEG bytes, and its first scan's component count.

    Follows libjpeg's reading of the header so that both find the same frame: segments are
    skipped by their length, bytes other than 0xFF between segments are skipped, runs of 0xFF
    are fill before a marker, FF 00 is no marker, TEM / RSTn have no length, and the first SOFn
    before the first SOS is the frame. Raises _BadHeader, or _Truncated when ``data`` ends first.
    """
    size = len(data)
    sof: tuple[int, int, int, int] | None = None
    pos = 2  # after SOI
    while True:
        pos = data.find(b"\xff", pos)  # libjpeg skips stray bytes between segments the same way
        if pos < 0:
            raise _Truncated
        while pos < size and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= size:
            raise _Truncated
        marker = data[pos]
        pos += 1
        if marker == 0x00 or marker in _STANDALONE:
            continue
        if marker == _SOI:
            raise _BadHeader("corrupt", "it has a second start-of-image marker")
        if marker == _EOI:
            raise _BadHeader("corrupt", "it ends (EOI) before its frame header and first scan")
        if pos + 2 > size:
            raise _Truncated
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2:
            raise _BadHeader("corrupt", f"marker 0x{marker:02X} has a segment length of {length}")
        if marker == _SOF55:
            raise _BadHeader("unsupported_format", "is JPEG-LS, not baseline / progressive JPEG")
        if marker in _SOF_MARKERS:
            if sof is not None:
                raise _BadHeader("corrupt", "it has two frame headers (SOF) before its first scan")
            if length < 8:
                raise _BadHeader("corrupt", f"its frame header has a length of {length}")
            if pos + 8 > size:
                raise _Truncated
            height = (data[pos + 3] << 8) | data[pos + 4]
            width = (data[pos + 5] << 8) | data[pos + 6]
            sof = (marker, width, height, data[pos + 7])
        elif marker == _SOS:
            if sof is None:
                raise _BadHeader("corrupt", "it has a scan before any frame header (SOF)")
            if pos + 3 > size:
                raise _Truncated
            return _JpegFrame(*sof, data[pos + 2])
        pos += length


def _read_header(buf: np.ndarray) -> _Header:
    """Codec and size of compressed image bytes from their header alone (nothing is decoded)."""
    head = buf[:32].tobytes()
    if head.startswith(_PNG_SIGNATURE):
        # The first chunk must be IHDR, 13 bytes: width, height (big-endian uint32), then depth.
        if len(head) < 24:
            raise _BadHeader("corrupt", "it ends before its IHDR header", "png")
        if head[8:16] != b"\x00\x00\x00\x0dIHDR":
            raise _BadHeader("corrupt", "it does not start with an IHDR chunk", "png")
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        # The PNG spec caps both at 2^31 - 1; libpng refuses zero and larger values.
        if not (0 < width < 1 << 31 and 0 < height < 1 << 31):
            raise _BadHeader(
                "corrupt", f"its header declares an invalid size {width}x{height}", "png"
            )
        return _Header("png", width, height, False, "PNG")
    if head.startswith(_JPEG_SIGNATURE):
        peek = buf[:_JPEG_PEEK].tobytes()
        try:
            frame = _jpeg_frame(peek)
        except _Truncated:
            if buf.size <= len(peek):
                raise _BadHeader("corrupt", "it ends inside its header") from None
            try:  # a header longer than the peek (large EXIF / ICC segments): scan it all
                frame = _jpeg_frame(buf.tobytes())
            except _Truncated:
                raise _BadHeader("corrupt", "it ends inside its header") from None
        if frame.width == 0 or frame.height == 0:
            # Height 0 means "given later by a DNL marker", which libjpeg does not support.
            raise _BadHeader(
                "corrupt", f"its frame header declares a size of {frame.width}x{frame.height}"
            )
        reducible = (
            frame.marker in _SEQUENTIAL_DCT and frame.scan_components >= frame.frame_components
        )
        return _Header(
            "jpeg", frame.width, frame.height, reducible, f"{_SOF_NAMES[frame.marker]} JPEG"
        )
    other = _other_format(head)
    if other:
        raise _BadHeader("unsupported_format", f"holds {other} data")
    raise _BadHeader("corrupt", "it starts with neither the JPEG nor the PNG signature")


_IGNORE_ORIENTATION = getattr(cv2, "IMREAD_IGNORE_ORIENTATION", 0)
_IMREAD_BGR = cv2.IMREAD_COLOR | _IGNORE_ORIENTATION
# OpenCV >= 4.10 decodes straight to RGB (one pass less); older versions decode BGR and swap.
_IMREAD_RGB = (
    cv2.IMREAD_COLOR_RGB | _IGNORE_ORIENTATION if hasattr(cv2, "IMREAD_COLOR_RGB") else None
)
# Decoding at 1/n scale: libjpeg scales while decoding (other codecs would decode full size and
# resize, so only JPEG is sent here). BGR, because OpenCV 5 refuses REDUCED_COLOR_n together
# with IMREAD_COLOR_RGB (both carry the colour bit).
_IMREAD_REDUCED_BGR: dict[int, int] = {
    2: cv2.IMREAD_REDUCED_COLOR_2 | _IGNORE_ORIENTATION,
    4: cv2.IMREAD_REDUCED_COLOR_4 | _IGNORE_ORIENTATION,
    8: cv2.IMREAD_REDUCED_COLOR_8 | _IGNORE_ORIENTATION,
}


def _scaled(size: int, denominator: int) -> int:
    """A JPEG dimension decoded at 1/denominator scale (libjpeg rounds up)."""
    return -(-size // denominator)


def _cv_error_text(exc: cv2.error) -> str:
    """The gist of an OpenCV exception on one short line (its full text spans several)."""
    text = " ".join(str(getattr(exc, "err", "") or exc).split())
    return text[:100]


def _imdecode_rgb(buf: np.ndarray, denominator: int) -> np.ndarray | None:
    """cv2.imdecode to RGB at 1/denominator scale (None when the decoder gives up)."""
    if denominator == 1 and _IMREAD_RGB is not None:
        return cv2.imdecode(buf, _IMREAD_RGB)
    flags = _IMREAD_BGR if denominator == 1 else _IMREAD_REDUCED_BGR[denominator]
    image = cv2.imdecode(buf, flags)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def compressed_to_rgb(
    msg: CompressedImage, *, max_pixels: int = 0, oversize: str = "reject"
) -> np.ndarray:
    """Decode a jpeg or png sensor_msgs/CompressedImage to a C-contiguous HxWx3 uint8 RGB array.

    The codec is taken from the data's signature (jpeg or png; anything else is rejected before
    decoding), the format field only has to name no other codec. Alpha is dropped, gray images
    are replicated to three channels and 16-bit PNGs are reduced to 8 bits. EXIF orientation is
    ignored so the pixel grid matches the camera's.
    The size in the header is checked against ``max_pixels`` (0 = no limit) and OpenCV's limits
    before decoding: a larger image is rejected, or with ``oversize="downscale"`` a sequential
    JPEG is decoded at the least of 1/2, 1/4, 1/8 scale that fits (PNG, progressive, multi-scan
    and lossless JPEG are still rejected: their decoders need full-size memory). Raises
    ImageDecodeError (with its ``kind``) for empty, corrupt, unsupported or oversize data.
    """
    _check_size_options(max_pixels, oversize)
    named = _compressed_codec(msg.format)
    buf = _buffer(msg.data)
    label = _quote(msg.format) if str(msg.format) else "(no format given)"
    if buf.size == 0:
        raise ImageDecodeError(f"compressed image {label} has no data", kind="no_data")
    prefix = f"compressed image {label} ({buf.size} bytes)"
    try:
        header = _read_header(buf)
    except _BadHeader as exc:
        if exc.kind == "corrupt":
            codec = exc.codec or named or "jpeg or png"
            message = f"{prefix} is not valid {codec} data (corrupt or truncated): {exc.why}"
        else:
            message = f"{prefix} {exc.why}; supported: {', '.join(SUPPORTED_COMPRESSED_FORMATS)}"
        raise ImageDecodeError(message, kind=exc.kind) from None

    width, height, what = header.width, header.height, header.what
    described = f"{prefix} is a {what} of {width}x{height} ({width * height} pixels)"
    denominator = 1
    if max_pixels and width * height > max_pixels:
        too_big = f"{described}, more than max_pixels {max_pixels}"
        if oversize == "reject":
            raise ImageDecodeError(too_big, kind="oversize")
        if not header.reducible:
            raise ImageDecodeError(
                f"{too_big}, and a {what} cannot be decoded at reduced size without memory for "
                f"the full-size image",
                kind="oversize",
            )
        fits = [d for d in (2, 4, 8) if _scaled(width, d) * _scaled(height, d) <= max_pixels]
        if not fits:
            raise ImageDecodeError(
                f"{too_big}, even at 1/8 scale ({_scaled(width, 8)}x{_scaled(height, 8)})",
                kind="oversize",
            )
        denominator = fits[0]
    out_w, out_h = _scaled(width, denominator), _scaled(height, denominator)
    # OpenCV checks the size its decoder will produce (for JPEG the scaled one) and raises past
    # its limits; checked here first so that such an image counts as oversize, not corrupt.
    if out_w * out_h > _CV_MAX_PIXELS or out_w > _CV_MAX_WIDTH or out_h > _CV_MAX_HEIGHT:
        raise ImageDecodeError(
            f"{described}, over OpenCV's decoder limits ({_CV_MAX_WIDTH} wide, {_CV_MAX_HEIGHT} "
            f"high, {_CV_MAX_PIXELS} pixels; OPENCV_IO_MAX_IMAGE_*)",
            kind="oversize",
        )
    try:
        rgb = _imdecode_rgb(buf, denominator)
    except cv2.error as exc:  # some decoders raise instead of returning None
        kind = "oversize" if "CV_IO_MAX_IMAGE" in str(exc) else "corrupt"
        raise ImageDecodeError(
            f"{prefix} is not valid {header.codec} data (corrupt or truncated): "
            f"{_cv_error_text(exc)}",
            kind=kind,
        ) from None
    if rgb is None:
        raise ImageDecodeError(
            f"{prefix} is not valid {header.codec} data (corrupt or truncated): the decoder "
            f"refused it",
            kind="corrupt",
        )
    if rgb.shape[0] * rgb.shape[1] > out_w * out_h:
        # The decoder read a larger size than the header scan found: a crafted header that
        # parses two ways. Refused, so the size limit cannot be bypassed that way.
        scale = f" at 1/{denominator} scale" if denominator > 1 else ""
        raise ImageDecodeError(
            f"{prefix} decoded to {rgb.shape[1]}x{rgb.shape[0]}{scale} but its header declares "
            f"{width}x{height}",
            kind="corrupt",
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
