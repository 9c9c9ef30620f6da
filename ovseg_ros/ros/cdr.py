"""sensor_msgs/Image in its serialized (CDR) form: the node's images without rclpy's conversions.

rclpy turns a received Image into Python objects (the pixels copied into an array.array) and a
published one back into C and then into CDR (two more copies). For a 640x480 rgb8 frame those
conversions take about 0.23 ms each way on a laptop-class CPU. The node instead subscribes to its
Image input serialized (`raw=True`) and reads the fields and a zero-copy view of the pixels
straight from the CDR bytes (`parse_image`), and publishes its Image outputs as CDR bytes built
with one copy of the pixels (`image_bytes`); rclpy hands bytes to the RMW as they are.

The layout is plain CDR (XCDR1) as every ROS 2 RMW writes it: a 4-byte encapsulation header
(0x0001 little-endian, 0x0000 big-endian), then the fields in order, each primitive aligned to its
size counted from the end of the encapsulation header, strings as a uint32 length (with the
terminating NUL) and the characters, sequences as a uint32 count and the elements.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from builtin_interfaces.msg import Time
from std_msgs.msg import Header

from .decode import ImageDecodeError

__all__ = ["ImageView", "image_bytes", "parse_image"]

_LITTLE = b"\x00\x01\x00\x00"
_BIG = b"\x00\x00\x00\x00"
#: The largest string the node reads in a frame's header or encoding (frame ids and encodings
#: are short; a longer one is a malformed or hostile message).
MAX_STRING = 4096


@dataclass
class ImageView:
    """The fields of a serialized sensor_msgs/Image, read as decode.image_to_rgb reads an Image.

    `data` is a read-only uint8 view of the serialized bytes: no pixel is copied.
    """

    header: Header
    height: int
    width: int
    encoding: str
    is_bigendian: int
    step: int
    data: np.ndarray


def _pad(offset: int, size: int) -> int:
    """Bytes of padding before a primitive of `size` bytes at body offset `offset`."""
    return -offset % size


def _string(text: str, offset: int) -> bytes:
    """A CDR string at body offset `offset` (its padding first)."""
    raw = text.encode("utf-8") + b"\x00"
    return b"\x00" * _pad(offset, 4) + struct.pack("<I", len(raw)) + raw


def image_bytes(
    pixels: np.ndarray, encoding: str, header: Header | None, bytes_per_pixel: int
) -> bytes:
    """The serialized little-endian sensor_msgs/Image of an HxW or HxWxC array (no row padding).

    Byte for byte what rclpy.serialization.serialize_message writes for the same Image, padding
    aside (zeros here, whatever was in memory there); is_bigendian is 0, so 16-bit pixels must be
    little-endian already.
    """
    stamp_sec, stamp_nsec, frame_id = 0, 0, ""
    if header is not None:
        stamp_sec, stamp_nsec = int(header.stamp.sec), int(header.stamp.nanosec)
        frame_id = str(header.frame_id)
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    flat = np.ascontiguousarray(pixels).reshape(-1).view(np.uint8)
    if flat.size >= 2**32:
        raise ValueError(f"an Image holds less than 4 GiB of pixels, not {flat.size} bytes")
    body = bytearray(struct.pack("<iI", stamp_sec, stamp_nsec))
    body += _string(frame_id, len(body))
    body += b"\x00" * _pad(len(body), 4) + struct.pack("<II", height, width)
    body += _string(encoding, len(body))
    body += b"\x00"  # is_bigendian
    body += b"\x00" * _pad(len(body), 4) + struct.pack("<II", width * bytes_per_pixel, flat.size)
    return b"".join((_LITTLE, body, flat))


class _Reader:
    """Reads CDR primitives from a buffer, each one checked against the buffer's end."""

    def __init__(self, buf: memoryview, order: str) -> None:
        self.buf, self.order, self.pos = buf, order, 4  # after the encapsulation header

    def _take(self, size: int, what: str) -> int:
        start = self.pos
        if start + size > len(self.buf):
            raise ImageDecodeError(
                f"serialized Image ends ({len(self.buf)} bytes) inside its {what}",
                kind="malformed_message",
            )
        self.pos = start + size
        return start

    def u32(self, what: str) -> int:
        self.pos += _pad(self.pos - 4, 4)
        return struct.unpack_from(self.order + "I", self.buf, self._take(4, what))[0]

    def i32(self, what: str) -> int:
        self.pos += _pad(self.pos - 4, 4)
        return struct.unpack_from(self.order + "i", self.buf, self._take(4, what))[0]

    def u8(self, what: str) -> int:
        return self.buf[self._take(1, what)]

    def string(self, what: str) -> str:
        length = self.u32(f"{what}'s length")
        if length == 0 or length > MAX_STRING:
            raise ImageDecodeError(
                f"serialized Image has a {what} of length {length} (1 to {MAX_STRING} with its "
                "terminating NUL)",
                kind="malformed_message",
            )
        start = self._take(length, what)
        raw = bytes(self.buf[start : start + length])
        if raw[-1] != 0:
            raise ImageDecodeError(
                f"serialized Image's {what} is not NUL-terminated", kind="malformed_message"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ImageDecodeError(
                f"serialized Image's {what} is not UTF-8 ({exc.reason})", kind="malformed_message"
            ) from exc


def parse_image(serialized: bytes) -> ImageView:
    """The fields of a serialized sensor_msgs/Image, the pixels a view of `serialized`.

    Raises ImageDecodeError (kind "malformed_message") for bytes that are not a whole CDR Image:
    an unknown encapsulation, a field cut off, a string without its NUL, more data announced than
    the message holds. The geometry (width x height against step and data) is decode's to check.
    """
    buf = memoryview(serialized).cast("B")
    head = bytes(buf[:4])
    if head[:2] == _LITTLE[:2]:
        order = "<"
    elif head[:2] == _BIG[:2] and len(head) == 4:
        order = ">"
    else:
        raise ImageDecodeError(
            "serialized Image does not start with a plain CDR header "
            f"(got {head.hex() or 'no bytes'})",
            kind="malformed_message",
        )
    reader = _Reader(buf, order)
    sec = reader.i32("header.stamp.sec")
    nanosec = reader.u32("header.stamp.nanosec")
    frame_id = reader.string("header.frame_id")
    height = reader.u32("height")
    width = reader.u32("width")
    encoding = reader.string("encoding")
    is_bigendian = reader.u8("is_bigendian")
    step = reader.u32("step")
    size = reader.u32("data's length")
    start = reader._take(size, f"data ({size} bytes announced)")
    data = np.frombuffer(serialized, np.uint8, count=size, offset=start)
    header = Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id=frame_id)
    return ImageView(header, height, width, encoding, is_bigendian, step, data)
