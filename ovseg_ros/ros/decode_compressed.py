"""Decoding of sensor_msgs/CompressedImage messages (jpeg or png) to HxWx3 uint8 RGB arrays.

Compressed images are jpeg or png, recognised by their signature bytes; any other format (BMP,
TIFF, WebP... that OpenCV would also decode) is rejected before the decoder sees it.

Size limits (``max_pixels``, 0 = none) are checked before anything is decoded or allocated, from
the PNG IHDR chunk or the JPEG frame header (SOFn). An image over the limit is rejected, or with
``oversize="downscale"`` a JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg. A PNG, a
progressive or multi-scan JPEG and a lossless JPEG over the limit are rejected even then, since
their decoders need memory for the full-size image whatever the output size. OpenCV's own limits
(``OPENCV_IO_MAX_IMAGE_PIXELS``, ``..._WIDTH``, ``..._HEIGHT``, read when its library loads) are
checked the same way, so an image OpenCV would refuse is reported as ``oversize`` too.

Rejections raise ``decode.ImageDecodeError`` with one of its ``REJECTION_KINDS``.
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage

from .decode import ImageDecodeError, _buffer, _check_size_options, _quote

__all__ = ["SUPPORTED_COMPRESSED_FORMATS", "compressed_to_rgb"]

#: Codecs compressed_to_rgb accepts in CompressedImage.format (an empty format is sniffed).
SUPPORTED_COMPRESSED_FORMATS: tuple[str, ...] = ("jpeg", "png")


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
