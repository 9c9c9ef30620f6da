"""Tests for encoding the node's outputs (labels, confidence, masks, overlay) as sensor_msgs/Image,
read back with msg_to_array."""

import array

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from codecutil import random_rgb
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from ovseg_ros.ros.decode import image_to_rgb, msg_to_array
from ovseg_ros.ros.encode import (
    labels_to_bytes,
    labels_to_msg,
    mono8_to_bytes,
    mono8_to_msg,
    rgb_to_bytes,
    rgb_to_msg,
)

# rosidl_parser (inside the ROS wheels) imports lark, which imports the deprecated sre_* modules.
pytestmark = pytest.mark.filterwarnings("ignore:module 'sre_:DeprecationWarning")


def header() -> Header:
    return Header(stamp=Time(sec=1700000000, nanosec=123456789), frame_id="camera_optical")


def assert_header_copied(msg: Image, original: Header) -> None:
    assert msg.header.stamp.sec == original.stamp.sec
    assert msg.header.stamp.nanosec == original.stamp.nanosec
    assert msg.header.frame_id == original.frame_id
    assert msg.header is not original


@pytest.mark.parametrize("height,width", [(1, 1), (7, 13), (480, 640)])
def test_labels_uint8_round_trip(height, width):
    labels = np.random.default_rng(1).integers(0, 256, (height, width), dtype=np.uint8)
    h = header()
    msg = labels_to_msg(labels, h)
    assert (msg.encoding, msg.height, msg.width, msg.step) == ("mono8", height, width, width)
    assert msg.is_bigendian == 0
    assert len(msg.data) == height * width
    assert isinstance(msg.data, array.array) and msg.data.typecode == "B"
    assert_header_copied(msg, h)
    out = msg_to_array(msg)
    assert out.dtype == np.uint8 and out.shape == (height, width)
    np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize("height,width", [(1, 1), (7, 13), (480, 640)])
def test_labels_uint16_round_trip(height, width):
    labels = np.random.default_rng(2).integers(0, 65536, (height, width), dtype=np.uint16)
    labels.flat[0] = 65535
    h = header()
    msg = labels_to_msg(labels, h)
    assert (msg.encoding, msg.step, msg.is_bigendian) == ("mono16", 2 * width, 0)
    assert bytes(msg.data) == labels.astype("<u2").tobytes()  # little-endian on any host
    assert_header_copied(msg, h)
    out = msg_to_array(msg)
    assert out.dtype == np.uint16 and out.shape == (height, width)
    np.testing.assert_array_equal(out, labels)


def test_labels_from_non_contiguous_array():
    labels = np.arange(7 * 26, dtype=np.uint16).reshape(7, 26)[:, ::2]
    np.testing.assert_array_equal(msg_to_array(labels_to_msg(labels, header())), labels)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4), dtype=np.int32),
        np.zeros((4, 4), dtype=np.float32),
        np.zeros((4, 4, 1), dtype=np.uint8),
        np.zeros((0, 4), dtype=np.uint8),
    ],
)
def test_labels_rejects_bad_arrays(bad):
    with pytest.raises(ValueError):
        labels_to_msg(bad, header())


def test_header_none_gives_empty_header():
    msg = labels_to_msg(np.zeros((2, 2), np.uint8), None)
    assert msg.header.frame_id == "" and msg.header.stamp.sec == 0


def test_mono8_round_trip():
    conf = np.random.default_rng(3).integers(0, 256, (7, 13), dtype=np.uint8)
    h = header()
    msg = mono8_to_msg(conf, h)
    assert (msg.encoding, msg.step, msg.is_bigendian) == ("mono8", 13, 0)
    assert_header_copied(msg, h)
    np.testing.assert_array_equal(msg_to_array(msg), conf)
    with pytest.raises(ValueError, match="uint8"):
        mono8_to_msg(conf.astype(np.uint16), h)


@pytest.mark.parametrize("height,width", [(1, 1), (7, 13), (1080, 1920)])
def test_rgb_round_trip(height, width):
    rgb = random_rgb(height, width, seed=4)
    h = header()
    msg = rgb_to_msg(rgb, h)
    assert (msg.encoding, msg.height, msg.width, msg.step) == ("rgb8", height, width, 3 * width)
    assert msg.is_bigendian == 0
    assert_header_copied(msg, h)
    np.testing.assert_array_equal(msg_to_array(msg), rgb)
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


def test_rgb_to_msg_rejects_bad_arrays():
    with pytest.raises(ValueError, match="height x width x 3"):
        rgb_to_msg(np.zeros((4, 4), np.uint8), header())
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_msg(np.zeros((4, 4, 3), np.float32), header())


def test_output_survives_serialization():
    from rclpy.serialization import deserialize_message, serialize_message

    labels = np.random.default_rng(5).integers(0, 65536, (7, 13), dtype=np.uint16)
    received = deserialize_message(serialize_message(labels_to_msg(labels, header())), Image)
    np.testing.assert_array_equal(msg_to_array(received), labels)
    assert received.header.frame_id == "camera_optical"


# --- serialized (what the node publishes) ------------------------------------------------------


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


SERIALIZED = [
    ("labels", labels_to_msg, labels_to_bytes, np.uint8, ()),
    ("labels16", labels_to_msg, labels_to_bytes, np.uint16, ()),
    ("mono8", mono8_to_msg, mono8_to_bytes, np.uint8, ()),
    ("rgb8", rgb_to_msg, rgb_to_bytes, np.uint8, (3,)),
]


@pytest.mark.parametrize(
    "name,to_msg,to_bytes,dtype,channels", SERIALIZED, ids=[c[0] for c in SERIALIZED]
)
@pytest.mark.parametrize("frame_id", ["", "a", "ab", "abc", "abcd", "camera_color_optical_frame"])
def test_the_published_bytes_are_rclpys_serialization(
    name, to_msg, to_bytes, dtype, channels, frame_id
):
    """For every alignment of the strings: the bytes are what rclpy would write, padding aside
    (zeros), and they read back as the same Image and pixels."""
    rng = np.random.default_rng(len(frame_id))
    shape = (int(rng.integers(1, 9)), int(rng.integers(1, 9)), *channels)
    pixels = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    head = Header(stamp=Time(sec=-3 if frame_id else 0, nanosec=999_999_999), frame_id=frame_id)
    msg, ours = to_msg(pixels, head), to_bytes(pixels, head)
    reference = serialize_message(msg)
    assert isinstance(ours, bytes) and len(ours) == len(reference)
    mask = padding_mask(msg)
    mine, theirs = np.frombuffer(ours, np.uint8), np.frombuffer(reference, np.uint8)
    assert np.array_equal(mine[mask], theirs[mask])
    assert not mine[~mask].any()
    back = deserialize_message(ours, Image)
    assert back == msg
    assert np.array_equal(msg_to_array(back), pixels)


def test_serialized_outputs_check_their_input_as_the_messages_do():
    with pytest.raises(ValueError, match="2-D"):
        mono8_to_bytes(np.zeros((2, 2, 3), np.uint8), None)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        labels_to_bytes(np.zeros((2, 2), np.int32), None)
    with pytest.raises(ValueError, match="height x width x 3"):
        rgb_to_bytes(np.zeros((2, 2), np.uint8), None)
    assert deserialize_message(mono8_to_bytes(np.ones((1, 2), np.uint8), None), Image).header == (
        Header()
    )
