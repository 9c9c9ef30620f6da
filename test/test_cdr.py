"""Serialized sensor_msgs/Image (cdr.py): what the node reads its input from and publishes.

rclpy's own serialize_message / deserialize_message are the reference: the node's bytes must be
the ones rclpy would write (padding aside), and its reading must give the fields rclpy gives,
for every alignment of the strings and any stamp; bytes that are not a whole Image are rejected
with ImageDecodeError("malformed_message"), never read past their end.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from ovseg_ros.ros.cdr import MAX_STRING, parse_image
from ovseg_ros.ros.decode import ImageDecodeError, image_to_rgb, msg_to_array
from ovseg_ros.ros.encode import (
    labels_to_bytes,
    labels_to_msg,
    mono8_to_bytes,
    mono8_to_msg,
    rgb_to_bytes,
    rgb_to_msg,
)


def header(frame_id: str, sec: int = 1_700_000_000, nanosec: int = 123_456_789) -> Header:
    h = Header(frame_id=frame_id)
    h.stamp.sec, h.stamp.nanosec = sec, nanosec
    return h


def padding_mask(msg: Image) -> np.ndarray:
    """True at the bytes of serialize_message(msg) that are fields, False at alignment padding
    (which rclpy leaves as whatever was in memory)."""
    fields = np.zeros(len(serialize_message(msg)), bool)
    pos = 4

    def put(size: int, align: int) -> None:
        nonlocal pos
        pos += -(pos - 4) % align
        fields[pos : pos + size] = True
        pos += size

    put(8, 4)  # stamp
    put(4 + len(msg.header.frame_id.encode()) + 1, 4)
    put(8, 4)  # height, width
    put(4 + len(msg.encoding) + 1, 4)
    put(1, 1)  # is_bigendian
    put(4, 4)  # step
    put(4 + len(msg.data), 4)
    fields[:4] = True
    assert pos == len(fields)
    return fields


CASES = [
    ("labels", lambda a, h: (labels_to_msg(a, h), labels_to_bytes(a, h)), np.uint8, ()),
    ("labels16", lambda a, h: (labels_to_msg(a, h), labels_to_bytes(a, h)), np.uint16, ()),
    ("mono8", lambda a, h: (mono8_to_msg(a, h), mono8_to_bytes(a, h)), np.uint8, ()),
    ("rgb8", lambda a, h: (rgb_to_msg(a, h), rgb_to_bytes(a, h)), np.uint8, (3,)),
]


@pytest.mark.parametrize("name,encode,dtype,channels", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("frame_id", ["", "a", "ab", "abc", "abcd", "camera_color_optical_frame"])
def test_the_nodes_bytes_are_rclpys_serialization(name, encode, dtype, channels, frame_id):
    rng = np.random.default_rng(len(frame_id))
    shape = (int(rng.integers(1, 9)), int(rng.integers(1, 9)), *channels)
    pixels = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    msg, ours = encode(pixels, header(frame_id, sec=-3 if frame_id else 0))
    reference = serialize_message(msg)
    assert isinstance(ours, bytes) and len(ours) == len(reference)
    mask = padding_mask(msg)
    mine, theirs = np.frombuffer(ours, np.uint8), np.frombuffer(reference, np.uint8)
    assert np.array_equal(mine[mask], theirs[mask])
    assert not mine[~mask].any()  # the node's padding is zeros
    back = deserialize_message(ours, Image)
    assert back == msg
    assert np.array_equal(msg_to_array(back), pixels)


@pytest.mark.parametrize("frame_id", ["", "xy", "xyz", "frame/é"])
@pytest.mark.parametrize("encoding,channels", [("bgr8", 3), ("mono16", 2), ("rgba8", 4)])
def test_parse_reads_what_rclpy_writes_and_the_pixels_are_not_copied(frame_id, encoding, channels):
    rng = np.random.default_rng(7)
    height, width, pad = 3, 5, 2
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=1)
    msg.step = width * channels + pad
    msg.header = header(frame_id, sec=2**31 - 1, nanosec=999_999_999)
    msg.data = rng.integers(0, 256, msg.step * height, dtype=np.uint8).tobytes()
    serialized = serialize_message(msg)
    view = parse_image(serialized)
    assert view.header == msg.header
    assert (view.height, view.width, view.encoding, view.is_bigendian, view.step) == (
        height,
        width,
        encoding,
        1,
        msg.step,
    )
    assert view.data.tobytes() == bytes(msg.data)
    assert not view.data.flags.owndata and not view.data.flags.writeable
    # decode reads the view exactly as the message rclpy would have made of the same bytes
    assert np.array_equal(image_to_rgb(view), image_to_rgb(deserialize_message(serialized, Image)))


def test_parse_reads_big_endian_cdr():
    # A big-endian writer's Image: encapsulation 0x0000 and every integer big-endian.
    body = struct.pack(">iII", 5, 6, 2) + b"f\x00" + b"\x00\x00" + struct.pack(">II", 1, 2)
    body += struct.pack(">I", 6) + b"mono8\x00" + b"\x00" + b"\x00" + struct.pack(">II", 2, 2)
    view = parse_image(b"\x00\x00\x00\x00" + body + b"\x07\x09")
    assert (view.header.stamp.sec, view.header.stamp.nanosec, view.header.frame_id) == (5, 6, "f")
    assert (view.height, view.width, view.encoding, view.step) == (1, 2, "mono8", 2)
    assert view.data.tolist() == [7, 9]


def good() -> bytes:
    return rgb_to_bytes(np.zeros((2, 3, 3), np.uint8), header("cam"))


def lying(announced: int) -> bytes:
    """good() with the data length field saying `announced`."""
    b = bytearray(good())
    struct.pack_into("<I", b, len(b) - 18 - 4, announced)
    return bytes(b)


def with_frame_id_length(length: int) -> bytes:
    b = bytearray(good())
    struct.pack_into("<I", b, 12, length)
    return bytes(b)


MALFORMED = {
    "empty": b"",
    "not cdr": b"\x89PNG\r\n\x1a\n" + bytes(40),
    "header only": b"\x00\x01\x00\x00",
    "cut in the stamp": good()[:9],
    "cut in the frame id": good()[:18],
    "cut before the data": good()[:-19],
    "cut in the data": good()[:-1],
    "more data announced": lying(19),
    "4 GiB announced": lying(2**32 - 1),
    "frame id without NUL": good()[:19] + b"X" + good()[20:],
    "frame id of length 0": with_frame_id_length(0),
    "frame id of 4 GB": with_frame_id_length(2**32 - 1),
    "frame id over the limit": with_frame_id_length(MAX_STRING + 1),
    "frame id not utf-8": good()[:16] + b"\xff\xfe\xfd\x00" + good()[20:],
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_bytes_that_are_not_a_whole_image_are_rejected_with_a_reason(name):
    with pytest.raises(ImageDecodeError) as err:
        parse_image(MALFORMED[name])
    assert err.value.kind == "malformed_message"
    assert "serialized Image" in str(err.value) and len(str(err.value)) < 200


def test_extra_bytes_after_the_data_are_ignored_as_rclpy_does():
    view = parse_image(good() + b"\x00\x00\x00")
    assert view.data.size == 18


def test_a_lying_geometry_is_left_to_decode():
    # height x step larger than the data is whole CDR; decode says what is wrong with it
    b = bytearray(good())
    struct.pack_into("<I", b, 20, 1000)  # height
    view = parse_image(bytes(b))
    assert view.height == 1000
    with pytest.raises(ImageDecodeError) as err:
        image_to_rgb(view)
    assert err.value.kind == "short_data"
