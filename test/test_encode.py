"""Tests for encoding the node's outputs (labels, confidence, masks, overlay) as sensor_msgs/Image,
read back with msg_to_array."""

import array

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from codecutil import random_rgb
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from ovseg_ros.ros.decode import image_to_rgb, msg_to_array
from ovseg_ros.ros.encode import labels_to_msg, mono8_to_msg, rgb_to_msg

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
