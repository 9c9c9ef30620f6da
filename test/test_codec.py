"""Tests for the sensor_msgs <-> numpy conversions (no rclpy node, no rclpy.init()).

Every input message is built here from raw bytes laid out by hand (channel order, alpha, 16-bit
byte order, UYVY / YUYV packing, row padding filled with junk), so the decoder is checked against
the encoding definitions rather than against itself.
"""

import array
import os
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from ovseg_ros.ros import codec
from ovseg_ros.ros.codec import (
    SUPPORTED_ENCODINGS,
    ImageDecodeError,
    compressed_to_rgb,
    cv_bridge_available,
    image_to_rgb,
    labels_to_msg,
    mono8_to_msg,
    msg_to_array,
    rgb_to_msg,
)

# rosidl_parser (inside the ROS wheels) imports lark, which imports the deprecated sre_* modules.
pytestmark = pytest.mark.filterwarnings("ignore:module 'sre_:DeprecationWarning")

YUV_ENCODINGS = ("yuv422", "uyvy", "yuv422_yuy2", "yuyv")
BYTES_PER_PIXEL = {
    "rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1,
    "mono16": 2, "yuv422": 2, "uyvy": 2, "yuv422_yuy2": 2, "yuyv": 2,
}  # fmt: skip
PAD_BYTE = 0xA5  # fills row padding: any leak into the result shows up as wrong pixels
# Where cv_bridge's own rgb8 conversion equals ours (mono16: it rounds 255/65535 instead of >> 8;
# uyvy / yuyv: newer names).
CV_BRIDGE_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "yuv422", "yuv422_yuy2")


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB image of uniformly random values 0-255."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth_rgb(height: int, width: int) -> np.ndarray:
    """A smooth RGB gradient: JPEG reproduces it within a few levels."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 127.5 + 100 * np.sin(x / 9.0) * np.cos(y / 7.0)
    return np.clip(np.rint(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


def bt601_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """BT.601 limited-range YUV -> RGB, per pixel (u and v already repeated per pixel).

    Y below 16 (footroom) is clamped to black, as OpenCV does.
    """
    c = np.maximum(y.astype(np.float64) - 16, 0) * 1.164
    d = u.astype(np.float64) - 128
    e = v.astype(np.float64) - 128
    rgb = np.stack([c + 1.596 * e, c - 0.392 * d - 0.813 * e, c + 2.017 * d], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def build(encoding: str, height: int, width: int, seed: int = 0, big_endian: bool = False):
    """(row bytes height x width*bpp, expected RGB, tolerance) for one encoding."""
    rng = np.random.default_rng(seed)
    rgb = random_rgb(height, width, seed)
    if encoding == "rgb8":
        return rgb.reshape(height, -1), rgb, 0
    if encoding == "bgr8":
        return rgb[..., ::-1].reshape(height, -1), rgb, 0
    if encoding in ("rgba8", "bgra8"):
        color = rgb if encoding == "rgba8" else rgb[..., ::-1]
        alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
        return np.concatenate([color, alpha], axis=-1).reshape(height, -1), rgb, 0
    if encoding == "mono8":
        gray = rgb[..., 0]
        return gray, np.repeat(gray[..., None], 3, axis=-1), 0
    if encoding == "mono16":
        values = rng.integers(0, 65536, (height, width), dtype=np.uint16)
        values.flat[0] = 65535
        raw = values.astype(">u2" if big_endian else "<u2").view(np.uint8).reshape(height, -1)
        high = (values >> 8).astype(np.uint8)
        return raw, np.repeat(high[..., None], 3, axis=-1), 0
    if encoding in YUV_ENCODINGS:
        y = rng.integers(0, 256, (height, width), dtype=np.uint8)
        u = rng.integers(0, 256, (height, width // 2), dtype=np.uint8)
        v = rng.integers(0, 256, (height, width // 2), dtype=np.uint8)
        raw = np.empty((height, width * 2), dtype=np.uint8)
        if encoding in ("yuv422", "uyvy"):  # U0 Y0 V0 Y1
            raw[:, 0::4], raw[:, 1::4], raw[:, 2::4], raw[:, 3::4] = u, y[:, 0::2], v, y[:, 1::2]
        else:  # Y0 U0 Y1 V0
            raw[:, 0::4], raw[:, 1::4], raw[:, 2::4], raw[:, 3::4] = y[:, 0::2], u, y[:, 1::2], v
        expected = bt601_to_rgb(y, np.repeat(u, 2, axis=1), np.repeat(v, 2, axis=1))
        return raw, expected, 2
    raise AssertionError(encoding)


def image_msg(
    encoding: str,
    raw: np.ndarray,
    width: int,
    pad: int = 0,
    big_endian: bool = False,
    container=bytes,
) -> Image:
    """An Image message whose rows are `raw` followed by `pad` junk bytes each."""
    height = raw.shape[0]
    rows = np.full((height, raw.shape[1] + pad), PAD_BYTE, dtype=np.uint8)
    rows[:, : raw.shape[1]] = raw
    msg = Image()
    msg.header = Header(stamp=Time(sec=12, nanosec=34), frame_id="camera")
    msg.height, msg.width, msg.encoding = height, width, encoding
    msg.is_bigendian = int(big_endian)
    msg.step = raw.shape[1] + pad
    msg.data = rows.tobytes()  # the generated setter stores an array.array('B')
    if container is not array.array:  # bypass the setter: data as other publishers may leave it
        data = rows.tobytes()
        msg._data = container(data)
    return msg


def sizes_for(encoding: str) -> list[tuple[int, int]]:
    if encoding in YUV_ENCODINGS:
        return [(1, 2), (7, 14), (480, 640)]
    return [(1, 1), (7, 13), (480, 640)]


CASES = [
    pytest.param(enc, h, w, pad, id=f"{enc}-{h}x{w}-pad{pad}")
    for enc in SUPPORTED_ENCODINGS
    for (h, w) in sizes_for(enc)
    for pad in (0, 5)
]


# --- image_to_rgb: every encoding ----------------------------------------------------------


@pytest.mark.parametrize("encoding,height,width,pad", CASES)
def test_image_to_rgb_every_encoding(encoding, height, width, pad):
    raw, expected, tol = build(encoding, height, width, seed=height + width + pad)
    out = image_to_rgb(image_msg(encoding, raw, width, pad=pad))
    assert out.shape == (height, width, 3)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous
    if tol == 0:
        np.testing.assert_array_equal(out, expected)
    else:
        assert np.abs(out.astype(int) - expected.astype(int)).max() <= tol


@pytest.mark.parametrize("pad", [0, 3])
def test_sixteen_bit_big_endian(pad):
    raw, expected, _ = build("mono16", 7, 13, seed=5, big_endian=True)
    out = image_to_rgb(image_msg("mono16", raw, 13, pad=pad, big_endian=True))
    np.testing.assert_array_equal(out, expected)


def test_mono16_scaling_is_high_byte():
    values = np.array([[0, 255, 256, 383, 384, 65280, 65535]], dtype=np.uint16)
    raw = values.astype("<u2").view(np.uint8).reshape(1, -1)
    out = image_to_rgb(image_msg("mono16", raw, values.shape[1]))
    assert out[0, :, 0].tolist() == [0, 0, 1, 1, 1, 255, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_yuv422_matches_opencv_and_known_colours():
    # Pure white, black and mid grey in UYVY: U = V = 128, Y = 235 / 16 / 126.
    raw = np.array([[128, 235, 128, 235, 128, 16, 128, 16, 128, 126, 128, 126]], dtype=np.uint8)
    out = image_to_rgb(image_msg("yuv422", raw, 6))
    assert out[0, :2].tolist() == [[255, 255, 255]] * 2
    assert out[0, 2:4].tolist() == [[0, 0, 0]] * 2
    assert np.abs(out[0, 4:].astype(int) - 128).max() <= 1
    # YUYV of the same pixels gives the same colours.
    yuyv = raw.reshape(1, -1, 2)[:, :, ::-1].reshape(1, -1)
    np.testing.assert_array_equal(image_to_rgb(image_msg("yuyv", yuyv, 6)), out)


def test_rgb8_without_padding_is_zero_copy():
    raw, expected, _ = build("rgb8", 7, 13)
    msg = image_msg("rgb8", raw, 13, container=array.array)
    out = image_to_rgb(msg)
    np.testing.assert_array_equal(out, expected)
    assert np.shares_memory(out, np.frombuffer(msg.data, dtype=np.uint8))


@pytest.mark.parametrize("container", [bytes, bytearray, array.array, list, memoryview])
def test_data_containers(container):
    raw, expected, _ = build("bgr8", 7, 13, seed=3)
    out = image_to_rgb(image_msg("bgr8", raw, 13, pad=2, container=container))
    np.testing.assert_array_equal(out, expected)


def test_message_through_serialization():
    """What a subscription hands over: rclpy's deserialized message (data as array.array)."""
    from rclpy.serialization import deserialize_message, serialize_message

    raw, expected, _ = build("yuv422_yuy2", 7, 14, seed=4)
    received = deserialize_message(
        serialize_message(image_msg("yuv422_yuy2", raw, 14, pad=4)), Image
    )
    assert isinstance(received.data, array.array)
    out = image_to_rgb(received)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 2


def test_extra_trailing_data_is_ignored():
    raw, expected, _ = build("rgb8", 7, 13)
    msg = image_msg("rgb8", raw, 13)
    msg.data = bytes(msg.data) + b"\x00" * 10
    np.testing.assert_array_equal(image_to_rgb(msg), expected)


def test_encoding_names_are_case_insensitive():
    raw, expected, _ = build("bgr8", 7, 13)
    np.testing.assert_array_equal(image_to_rgb(image_msg("BGR8", raw, 13)), expected)
    np.testing.assert_array_equal(image_to_rgb(image_msg(" Bgr8 ", raw, 13)), expected)


# --- image_to_rgb: rejections --------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(0, 13), (7, 0), (0, 0)])
def test_rejects_zero_size(height, width):
    msg = Image(height=height, width=width, encoding="rgb8", step=width * 3)
    with pytest.raises(ImageDecodeError, match="empty image") as err:
        image_to_rgb(msg)
    assert f"width {width} x height {height}" in str(err.value)
    assert "rgb8" in str(err.value)


@pytest.mark.parametrize("encoding", YUV_ENCODINGS)
def test_rejects_odd_width_yuv(encoding):
    raw = np.zeros((4, 7 * 2), dtype=np.uint8)
    with pytest.raises(ImageDecodeError, match="even width") as err:
        image_to_rgb(image_msg(encoding, raw, 7))
    assert "got 7" in str(err.value) and encoding in str(err.value)


@pytest.mark.parametrize("encoding", ["rgb8", "mono16", "yuv422"])
def test_rejects_short_data(encoding):
    raw, _, _ = build(encoding, 7, 14)
    msg = image_msg(encoding, raw, 14, pad=2)
    step = msg.step
    msg.data = bytes(msg.data)[: step * 7 - 1]
    with pytest.raises(ImageDecodeError) as err:
        image_to_rgb(msg)
    text = str(err.value)
    assert f"has {step * 7 - 1} bytes" in text
    assert f"step {step} x height 7 needs {step * 7}" in text
    assert encoding in text


def test_rejects_missing_data():
    msg = Image(height=4, width=4, encoding="mono8", step=4)
    with pytest.raises(ImageDecodeError, match="has 0 bytes but step 4 x height 4 needs 16"):
        image_to_rgb(msg)


@pytest.mark.parametrize("encoding,bpp", [("rgb8", 3), ("bgra8", 4), ("mono16", 2), ("yuyv", 2)])
def test_rejects_step_smaller_than_row(encoding, bpp):
    msg = Image(height=2, width=10, encoding=encoding, step=10 * bpp - 1)
    msg.data = bytes(2 * 10 * bpp)
    with pytest.raises(ImageDecodeError) as err:
        image_to_rgb(msg)
    text = str(err.value)
    assert f"row step {10 * bpp - 1} bytes is smaller than width 10 x {bpp}" in text
    assert encoding in text


@pytest.mark.parametrize("encoding", ["bayer_rggb8", "32FC1", "nv12", "rgb16", ""])
def test_rejects_unknown_encoding(encoding):
    msg = Image(height=2, width=2, encoding=encoding, step=2)
    msg.data = bytes(16)
    with pytest.raises(ImageDecodeError, match="unsupported image encoding") as err:
        image_to_rgb(msg)
    text = str(err.value)
    assert f"'{encoding}'" in text
    for name in SUPPORTED_ENCODINGS:
        assert name in text


def test_decode_error_is_a_value_error():
    assert issubclass(ImageDecodeError, ValueError)


# --- compressed ----------------------------------------------------------------------------


def compressed_msg(data: bytes, fmt: str) -> CompressedImage:
    msg = CompressedImage(format=fmt)
    msg.data = data
    return msg


def encode(rgb: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]), list(params))
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("fmt", ["jpeg", "rgb8; jpeg compressed bgr8", "JPEG", ""])
def test_compressed_jpeg_round_trip(fmt):
    rgb = smooth_rgb(48, 64)
    out = compressed_to_rgb(compressed_msg(encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95), fmt))
    assert out.shape == rgb.shape and out.dtype == np.uint8 and out.flags.c_contiguous
    diff = np.abs(out.astype(int) - rgb.astype(int))
    assert diff.mean() < 2.0 and diff.max() <= 24
    # Channel order: red rises left to right, green top to bottom.
    assert out[24, -1, 0] > 200 and out[24, 0, 0] < 40
    assert out[-1, 32, 1] > 200 and out[0, 32, 1] < 40


@pytest.mark.parametrize("fmt", ["png", "bgr8; png compressed bgr8", ""])
@pytest.mark.parametrize("height,width", [(1, 1), (7, 13), (480, 640)])
def test_compressed_png_round_trip_exact(fmt, height, width):
    rgb = random_rgb(height, width, seed=9)
    out = compressed_to_rgb(compressed_msg(encode(rgb, ".png"), fmt))
    np.testing.assert_array_equal(out, rgb)


def test_compressed_png_alpha_and_gray():
    rgb = random_rgb(7, 13, seed=2)
    rgba = np.concatenate([rgb, np.full((7, 13, 1), 10, np.uint8)], axis=-1)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    np.testing.assert_array_equal(compressed_to_rgb(compressed_msg(buf.tobytes(), "png")), rgb)
    gray = rgb[..., 0]
    ok, buf = cv2.imencode(".png", gray)
    out = compressed_to_rgb(compressed_msg(buf.tobytes(), "mono8; png compressed mono8"))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1))


def test_compressed_through_serialization():
    from rclpy.serialization import deserialize_message, serialize_message

    rgb = random_rgb(7, 13, seed=6)
    sent = compressed_msg(encode(rgb, ".png"), "png")
    received = deserialize_message(serialize_message(sent), CompressedImage)
    np.testing.assert_array_equal(compressed_to_rgb(received), rgb)


def test_compressed_without_imread_color_rgb(monkeypatch):
    """OpenCV before 4.10 (Humble's 4.5) has no IMREAD_COLOR_RGB: decode BGR, then swap."""
    monkeypatch.setattr(codec, "_IMREAD_RGB", None)
    rgb = random_rgb(7, 13, seed=7)
    np.testing.assert_array_equal(
        compressed_to_rgb(compressed_msg(encode(rgb, ".png"), "png")), rgb
    )
    with pytest.raises(ImageDecodeError, match="corrupt"):
        compressed_to_rgb(compressed_msg(b"not an image", "jpeg"))


def test_compressed_jpeg_exif_orientation_is_ignored():
    """A camera JPEG tagged 'rotate 90' keeps its pixel grid (it must match camera_info)."""
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255
    jpeg = encode(rgb, ".jpg")
    # APP1 Exif segment with a single IFD0 entry: Orientation (0x0112), SHORT, value 6.
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    tagged = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]
    assert cv2.imdecode(np.frombuffer(tagged, np.uint8), cv2.IMREAD_COLOR).shape == (40, 20, 3)
    out = compressed_to_rgb(compressed_msg(tagged, "jpeg"))
    assert out.shape == (20, 40, 3)
    assert out[:, :18].min() > 200 and out[:, 22:].max() < 50


@pytest.mark.parametrize("fmt", ["jpeg", "png", ""])
def test_compressed_rejects_empty(fmt):
    with pytest.raises(ImageDecodeError, match="has no data"):
        compressed_to_rgb(compressed_msg(b"", fmt))


def test_compressed_rejects_corrupt():
    garbage = np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match=r"\(500 bytes\) is not valid jpeg data"):
        compressed_to_rgb(compressed_msg(garbage, "jpeg"))
    png = encode(random_rgb(32, 32), ".png")
    with pytest.raises(ImageDecodeError, match="'png'.*corrupt or truncated"):
        compressed_to_rgb(compressed_msg(png[: len(png) // 2], "png"))
    jpeg = encode(smooth_rgb(32, 32), ".jpg")
    broken = jpeg[:2] + garbage
    with pytest.raises(ImageDecodeError, match="corrupt"):
        compressed_to_rgb(compressed_msg(broken, "rgb8; jpeg compressed bgr8"))


@pytest.mark.parametrize("fmt", ["h264", "theora", "16UC1; compressedDepth png", "bgr8; tiff"])
def test_compressed_rejects_unsupported_format(fmt):
    data = encode(random_rgb(4, 4), ".png")
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, fmt))
    text = str(err.value)
    assert f"'{fmt}'" in text and "jpeg, png" in text


# --- outputs -------------------------------------------------------------------------------


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


def test_msg_to_array_honours_padding_and_big_endian():
    values = np.random.default_rng(6).integers(0, 65536, (7, 13), dtype=np.uint16)
    raw = values.astype(">u2").view(np.uint8).reshape(7, -1)
    msg = image_msg("mono16", raw, 13, pad=3, big_endian=True)
    out = msg_to_array(msg)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, values)
    rgb = random_rgb(7, 13)
    np.testing.assert_array_equal(msg_to_array(image_msg("rgb8", rgb.reshape(7, -1), 13, 7)), rgb)


def test_msg_to_array_rejections():
    with pytest.raises(ImageDecodeError, match="not 'bgr8'"):
        msg_to_array(image_msg("bgr8", np.zeros((2, 6), np.uint8), 2))
    msg = image_msg("mono8", np.zeros((2, 6), np.uint8), 6)
    msg.data = bytes(5)
    with pytest.raises(ImageDecodeError, match="has 5 bytes"):
        msg_to_array(msg)


# --- cv_bridge ------------------------------------------------------------------------------


def test_use_cv_bridge_flag_never_changes_the_result():
    """With or without cv_bridge installed, asking for it gives the numpy path's arrays."""
    for encoding in SUPPORTED_ENCODINGS:
        raw, _, _ = build(encoding, 7, 14, seed=8)
        msg = image_msg(encoding, raw, 14)
        np.testing.assert_array_equal(image_to_rgb(msg, use_cv_bridge=True), image_to_rgb(msg))


@pytest.mark.skipif(
    not cv_bridge_available(),
    reason="ROS 2 cv_bridge is not importable (it ships with a ROS distribution, not as a wheel); "
    "the numpy path is the one tested here",
)
@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
@pytest.mark.parametrize("pad", [0, 6])
def test_cv_bridge_matches_numpy_path(encoding, pad):
    from cv_bridge import CvBridge

    raw, _, _ = build(encoding, 7, 14, seed=10)
    # Padding of whole pixels: cv_bridge's Python side cannot split a row of partial pixels.
    msg = image_msg(encoding, raw, 14, pad=pad * BYTES_PER_PIXEL[encoding], container=array.array)
    ours = image_to_rgb(msg)
    np.testing.assert_array_equal(image_to_rgb(msg, use_cv_bridge=True), ours)
    if encoding in CV_BRIDGE_ENCODINGS:
        direct = CvBridge().imgmsg_to_cv2(msg, desired_encoding="rgb8")
        np.testing.assert_array_equal(np.asarray(direct), ours)


def test_cv_bridge_dispatch(monkeypatch):
    """Which messages image_to_rgb hands to cv_bridge (a stand-in here) when asked to."""
    calls = []

    class FakeBridge:
        def imgmsg_to_cv2(self, msg, desired_encoding):
            calls.append((msg.encoding, desired_encoding))
            return image_to_rgb(msg)

    monkeypatch.setattr(codec, "_BRIDGE", FakeBridge())
    monkeypatch.setattr(codec, "_BRIDGE_CHECKED", True)
    assert cv_bridge_available()
    for encoding in SUPPORTED_ENCODINGS:
        raw, expected, tol = build(encoding, 7, 14, seed=11)
        for pad in (0, BYTES_PER_PIXEL[encoding], 1):
            calls.clear()
            msg = image_msg(encoding, raw, 14, pad=pad)
            out = image_to_rgb(msg, use_cv_bridge=True)
            assert np.abs(out.astype(int) - expected.astype(int)).max() <= tol
            whole_pixels = msg.step % BYTES_PER_PIXEL[encoding] == 0
            bridged = encoding in CV_BRIDGE_ENCODINGS and whole_pixels
            assert calls == ([(encoding, "rgb8")] if bridged else []), (encoding, pad)
            calls.clear()
            image_to_rgb(msg)
            assert calls == []


# --- rejection kinds and messages ----------------------------------------------------------


def raw_msg(encoding: str = "rgb8", height: int = 2, width: int = 2, step=None, data=None):
    """An Image with the given fields; data defaults to exactly step x height zero bytes."""
    msg = Image(height=height, width=width, encoding=encoding)
    msg.step = width * 3 if step is None else step
    if data is None:
        data = bytes(msg.step * height)
    msg._data = data  # bypass the setter: senders' data as it arrives, lists included
    return msg


def raw_compressed(data, fmt: str = "") -> CompressedImage:
    msg = CompressedImage()
    msg._format = fmt  # bypass the setters, as above
    msg._data = data
    return msg


BMP = encode(random_rgb(4, 4), ".bmp")
HALF_PNG = encode(random_rgb(32, 32), ".png")[:300]

# One message per way of failing: (id, expected kind, decode call).
REJECTIONS = [
    ("encoding", "unsupported_encoding", lambda: image_to_rgb(raw_msg("bayer_rggb8"))),
    ("generic", "unsupported_encoding", lambda: image_to_rgb(raw_msg("16UC1", step=4))),
    ("zero-size", "empty", lambda: image_to_rgb(raw_msg(height=0))),
    ("step", "bad_geometry", lambda: image_to_rgb(raw_msg(step=5))),
    ("odd-yuv", "odd_width", lambda: image_to_rgb(raw_msg("yuyv", width=3, step=6))),
    ("list-data", "bad_data_type", lambda: image_to_rgb(raw_msg(data=[0] * 11 + [300]))),
    ("object-data", "bad_data_type", lambda: image_to_rgb(raw_msg(data=object()))),
    ("short", "short_data", lambda: image_to_rgb(raw_msg(data=bytes(11)))),
    ("raw-big", "oversize", lambda: image_to_rgb(raw_msg(), max_pixels=3)),
    ("no-bytes", "no_data", lambda: compressed_to_rgb(raw_compressed(b"", "jpeg"))),
    ("h264", "unsupported_format", lambda: compressed_to_rgb(raw_compressed(BMP, "h264"))),
    ("bmp", "unsupported_format", lambda: compressed_to_rgb(raw_compressed(BMP, "png"))),
    ("garbage", "corrupt", lambda: compressed_to_rgb(raw_compressed(b"\x00" * 50, "jpeg"))),
    ("half-png", "corrupt", lambda: compressed_to_rgb(raw_compressed(HALF_PNG, "png"))),
    ("png-big", "oversize", lambda: compressed_to_rgb(raw_compressed(small_png()), max_pixels=15)),
    ("list-blob", "bad_data_type", lambda: compressed_to_rgb(raw_compressed([1, 2, 256]))),
]


def small_png() -> bytes:
    """A 4x4 PNG."""
    return encode(random_rgb(4, 4), ".png")


def test_rejection_kinds_are_a_documented_closed_set():
    kinds = codec.REJECTION_KINDS
    assert set(kinds) == {case[1] for case in REJECTIONS}  # every kind is reachable and tested
    for kind, description in kinds.items():
        assert kind.isidentifier() and kind == kind.lower() and len(kind) <= 20
        assert description and "\n" not in description and len(description) <= 100
    assert "REJECTION_KINDS" in codec.__all__
    assert codec.ImageDecodeError("x", kind="corrupt").kind == "corrupt"
    with pytest.raises(ValueError, match="unknown rejection kind"):
        codec.ImageDecodeError("x", kind="weird")


@pytest.mark.parametrize("kind,call", [c[1:] for c in REJECTIONS], ids=[c[0] for c in REJECTIONS])
def test_every_rejection_has_its_kind(kind, call):
    with pytest.raises(ImageDecodeError) as err:
        call()
    assert err.value.kind == kind
    text = str(err.value)
    assert "\n" not in text and 10 < len(text) <= 300, text


LONG = "x" * 200_000


@pytest.mark.parametrize(
    "call",
    [
        lambda: image_to_rgb(raw_msg(LONG)),
        lambda: image_to_rgb(raw_msg("16UC1" + LONG)),
        lambda: image_to_rgb(raw_msg("bgr8\n" * 40_000)),
        lambda: compressed_to_rgb(raw_compressed(b"\x00" * 9, "jpeg " + LONG)),
        lambda: compressed_to_rgb(raw_compressed(BMP, LONG)),
        lambda: compressed_to_rgb(raw_compressed(BMP, "compressedDepth " + LONG)),
        lambda: compressed_to_rgb(raw_compressed(b"", "png " + LONG)),
        lambda: compressed_to_rgb(raw_compressed(small_png(), "png " + LONG), max_pixels=1),
        lambda: msg_to_array(raw_msg(LONG)),
    ],
    ids=["encoding", "generic", "newlines", "jpeg", "format", "depth", "empty", "big", "output"],
)
def test_messages_never_echo_long_strings(call):
    """A 200 KB encoding or format string comes back as at most _ECHO_LIMIT characters."""
    with pytest.raises(ImageDecodeError) as err:
        call()
    text = str(err.value)
    assert len(text) <= 300 and "\n" not in text, text[:400]
    assert "characters)" in text  # says how long the string really was
    assert err.value.kind in codec.REJECTION_KINDS


@pytest.mark.parametrize(
    "encoding,words",
    [
        ("16UC1", ["depth", "mono16"]),
        ("16uc1", ["depth", "mono16"]),
        ("8UC1", ["generic", "mono8"]),
        ("8UC3", ["channel order", "bgr8"]),
        ("8UC4", ["channel order", "bgra8"]),
        ("32FC1", ["depth"]),
        ("16SC1", ["generic"]),
        ("64FC3", ["generic"]),
    ],
)
def test_rejects_generic_opencv_types(encoding, words):
    """16UC1 (a depth image sent by mistake) and friends are refused, saying why."""
    msg = raw_msg(encoding, height=48, width=64, step=64 * 8)
    with pytest.raises(ImageDecodeError) as err:
        image_to_rgb(msg)
    assert err.value.kind == "unsupported_encoding"
    text = str(err.value)
    assert f"'{encoding}'" in text and all(word in text for word in words), text
    assert "supported: rgb8" in text
    # With cv_bridge asked for as well: it must not be consulted for such an encoding.
    with pytest.raises(ImageDecodeError):
        image_to_rgb(msg, use_cv_bridge=True)


def test_supported_encodings_are_the_contracts():
    assert set(SUPPORTED_ENCODINGS) == {
        "rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16",
        "yuv422", "uyvy", "yuv422_yuy2", "yuyv",
    }  # fmt: skip
    # A depth image read back by msg_to_array (the node's outputs) is still fine.
    values = np.arange(6, dtype=np.uint16).reshape(2, 3)
    msg = image_msg("16UC1", values.astype("<u2").view(np.uint8).reshape(2, -1), 3)
    np.testing.assert_array_equal(msg_to_array(msg), values)
    with pytest.raises(ImageDecodeError) as err:
        image_to_rgb(msg)
    assert err.value.kind == "unsupported_encoding"


# --- raw frames: size limits ---------------------------------------------------------------


def test_raw_oversize_is_rejected_before_the_data_is_touched(monkeypatch):
    def touched(data):
        raise AssertionError("the data was read before the size check")

    monkeypatch.setattr(codec, "_buffer", touched)
    msg = raw_msg("rgb8", height=6000, width=8000, step=24000, data=b"")
    with pytest.raises(ImageDecodeError) as err:
        image_to_rgb(msg, max_pixels=3840 * 2160)
    assert err.value.kind == "oversize"
    assert "8000x6000" in str(err.value) and "8294400" in str(err.value)
    # Absurd sizes (uint32 maxima) are plain arithmetic, then refused the same way.
    huge = raw_msg("rgba8", height=2**32 - 1, width=2**32 - 1, step=2**32 - 1, data=b"")
    with pytest.raises(ImageDecodeError) as err:
        image_to_rgb(huge, max_pixels=1)
    assert err.value.kind == "bad_geometry"  # step < width x 4, found from the fields alone


def test_raw_absurd_sizes_without_a_limit_are_cheap_rejections():
    huge = raw_msg("mono8", height=2**32 - 1, width=2**32 - 1, step=2**32 - 1, data=bytes(10))
    with pytest.raises(ImageDecodeError) as err:
        image_to_rgb(huge, max_pixels=0)
    assert err.value.kind == "short_data"
    assert str(2**32 - 1) in str(err.value)


def test_raw_within_limit_is_unchanged():
    raw, expected, _ = build("rgb8", 48, 64)
    msg = image_msg("rgb8", raw, 64, container=array.array)
    for mode in codec.OVERSIZE_MODES:
        out = image_to_rgb(msg, max_pixels=48 * 64, oversize=mode)
        np.testing.assert_array_equal(out, expected)
        assert np.shares_memory(out, np.frombuffer(msg.data, dtype=np.uint8))  # still no copy
    with pytest.raises(ImageDecodeError) as err:
        image_to_rgb(msg, max_pixels=48 * 64 - 1)
    assert err.value.kind == "oversize"


@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
@pytest.mark.parametrize("pad", [0, 5])
def test_raw_downscale_every_encoding(encoding, pad):
    """Resized with INTER_AREA to the largest same-aspect size within max_pixels."""
    raw, expected, tol = build(encoding, 48, 64, seed=21)
    msg = image_msg(encoding, raw, 64, pad=pad)
    out = image_to_rgb(msg, max_pixels=24 * 32, oversize="downscale", use_cv_bridge=True)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    reference = cv2.resize(expected, (32, 24), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= tol + 1


def test_raw_downscale_odd_aspect():
    raw, expected, _ = build("bgr8", 7, 13, seed=22)
    out = image_to_rgb(image_msg("bgr8", raw, 13, pad=3), max_pixels=30, oversize="downscale")
    height, width = out.shape[:2]
    assert height * width <= 30 and (width, height) == codec._fit(13, 7, 30)
    reference = cv2.resize(expected, (width, height), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(out, reference)


@pytest.mark.parametrize(
    "width,height,max_pixels",
    [
        (64, 48, 768),
        (13, 7, 30),
        (8000, 6000, 3840 * 2160),
        (641, 479, 1000),
        (1_000_000, 1, 100),
        (1, 1_000_000, 100),
        (3, 100_000, 1),
        (65535, 65535, 7),
    ],
)
def test_fit_is_the_largest_size_within_the_limit(width, height, max_pixels):
    new_w, new_h = codec._fit(width, height, max_pixels)
    assert 1 <= new_w <= width and 1 <= new_h <= height
    assert new_w * new_h <= max_pixels < (new_w + 1) * (new_h + 1)
    if min(new_w, new_h) > 10:
        assert abs(new_w / new_h - width / height) < 0.02 * width / height


def test_size_options_are_checked():
    """Bad max_pixels / oversize values are the caller's bug: ValueError, not a rejection."""
    msg = raw_msg()
    for call in (image_to_rgb, compressed_to_rgb):
        target = msg if call is image_to_rgb else raw_compressed(small_png(), "png")
        for kwargs in ({"max_pixels": -1}, {"oversize": "shrink"}, {"oversize": "REJECT"}):
            with pytest.raises(ValueError) as err:
                call(target, **kwargs)
            assert not isinstance(err.value, ImageDecodeError)
        with pytest.raises(TypeError):
            call(target, max_pixels=2.5)


# --- compressed frames: headers ------------------------------------------------------------


def header_of(data: bytes):
    return codec._read_header(np.frombuffer(data, np.uint8))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def crafted_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a body of a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + body


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def sof(marker: int, width: int, height: int, components: int = 3) -> bytes:
    specs = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    return segment(marker, bytes([8]) + struct.pack(">HHB", height, width, components) + specs)


def sos(components: int) -> bytes:
    specs = b"".join(bytes([i + 1, 0]) for i in range(components))
    return segment(0xDA, bytes([components]) + specs + b"\x00\x3f\x00")


def crafted_jpeg(*parts: bytes) -> bytes:
    """SOI, the given segments, a few bytes of scan data and EOI."""
    return b"\xff\xd8" + b"".join(parts) + b"\x12" * 16 + b"\xff\xd9"


def jpeg_segments(data: bytes) -> tuple[list[bytes], bytes]:
    """A well-formed JPEG's header segments (each with its marker) and the rest from SOS on."""
    pos, segments = 2, []
    while data[pos + 1] != 0xDA:
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        segments.append(data[pos : pos + 2 + length])
        pos += 2 + length
    return segments, data[pos:]


def decoded_shape(data: bytes) -> tuple[int, ...]:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None
    return image.shape[:2]


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if OpenCV's decoder is called at all."""

    def imdecode(*args, **kwargs):
        raise AssertionError("cv2.imdecode was called")

    monkeypatch.setattr(cv2, "imdecode", imdecode)


SIZES = [(1, 1), (1, 2), (2, 1), (7, 13), (13, 7), (8, 8), (9, 17), (255, 256), (480, 640),
         (1, 3000), (2000, 3)]  # fmt: skip


@pytest.mark.parametrize("height,width", SIZES)
def test_header_size_of_real_images(height, width):
    """The header scan finds what libjpeg / libpng decode, for every variant OpenCV writes."""
    rgb = random_rgb(height, width, seed=height * 7 + width)
    gray = rgb[..., 0]
    variants = {
        "baseline JPEG": encode(rgb, ".jpg"),
        "baseline JPEG gray": cv2.imencode(".jpg", gray)[1].tobytes(),
        "progressive JPEG": encode(rgb, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "progressive JPEG gray": cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[
            1
        ].tobytes(),
        "baseline JPEG restart": encode(rgb, ".jpg", cv2.IMWRITE_JPEG_RST_INTERVAL, 1),
        "PNG": encode(rgb, ".png"),
        "PNG gray": cv2.imencode(".png", gray)[1].tobytes(),
        "PNG 16-bit": cv2.imencode(".png", gray.astype(np.uint16) * 257)[1].tobytes(),
        "PNG rgba": cv2.imencode(".png", np.dstack([rgb, gray]))[1].tobytes(),
    }
    sampling = getattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR", None)
    if sampling is not None:  # OpenCV >= 4.5.5
        variants["baseline JPEG 444"] = encode(rgb, ".jpg", sampling, 0x111111)
    for name, data in variants.items():
        header = header_of(data)
        assert (header.width, header.height) == (width, height), name
        assert decoded_shape(data) == (height, width), name
        is_png = name.startswith("PNG")
        assert header.codec == ("png" if is_png else "jpeg")
        assert header.what == ("PNG" if is_png else name.split(" JPEG")[0] + " JPEG"), name
        assert header.reducible == name.startswith("baseline"), name


def test_header_crafted_png_claiming_12000x12000(no_decoding):
    data = crafted_png(12000, 12000)
    assert len(data) < 100
    header = header_of(data)
    assert (header.codec, header.width, header.height) == ("png", 12000, 12000)
    assert not header.reducible
    msg = compressed_msg(data, "png")
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(msg, max_pixels=3840 * 2160)
    assert err.value.kind == "oversize"
    assert "PNG of 12000x12000 (144000000 pixels)" in str(err.value)
    assert "max_pixels 8294400" in str(err.value)
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(msg, max_pixels=3840 * 2160, oversize="downscale")
    assert err.value.kind == "oversize"
    assert "cannot be decoded at reduced size" in str(err.value)


@pytest.mark.parametrize(
    "ihdr,why",
    [
        (b"\x00\x00\x00\x0dIHDR" + struct.pack(">II", 0, 10), "invalid size 0x10"),
        (b"\x00\x00\x00\x0dIHDR" + struct.pack(">II", 2**31, 10), "invalid size"),
        (b"\x00\x00\x00\x0dIDAT" + struct.pack(">II", 10, 10), "IHDR"),
        (b"\x00\x00\x00\x0eIHDR" + struct.pack(">II", 10, 10), "IHDR"),
        (b"\x00\x00\x00\x0dIHDR\x00\x00", "ends before"),
    ],
)
def test_header_bad_png(no_decoding, ihdr, why):
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(b"\x89PNG\r\n\x1a\n" + ihdr, ""))
    assert err.value.kind == "corrupt" and why in str(err.value)
    assert "not valid png data" in str(err.value)


@pytest.fixture(scope="module")
def issue_png(tmp_path_factory) -> str:
    """A real, valid 140 KB PNG of 12000 x 12000 gray pixels (issue 10's 137 KB bomb)."""
    compressor = zlib.compressobj(9)
    row = bytes(12001)  # filter byte + 12000 zero pixels
    idat = b"".join(compressor.compress(row) for _ in range(12000)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", 12000, 12000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
    path = tmp_path_factory.mktemp("png") / "bomb.png"
    path.write_bytes(data + png_chunk(b"IEND", b""))
    return str(path)


def test_issue_png_bomb_is_rejected_before_decoding(issue_png, no_decoding):
    with open(issue_png, "rb") as f:
        data = f.read()
    assert len(data) < 150_000
    for mode in codec.OVERSIZE_MODES:
        with pytest.raises(ImageDecodeError) as err:
            compressed_to_rgb(compressed_msg(data, "png"), max_pixels=3840 * 2160, oversize=mode)
        assert err.value.kind == "oversize" and "12000x12000" in str(err.value)


PEAK_SCRIPT = """
import resource, sys
from sensor_msgs.msg import CompressedImage
from ovseg_ros.ros.codec import ImageDecodeError, compressed_to_rgb
msg = CompressedImage(format="png")
msg.data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    compressed_to_rgb(msg, max_pixels=3840 * 2160, oversize=sys.argv[2])
except ImageDecodeError as exc:
    print(exc.kind)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_issue_png_bomb_peak_memory(issue_png):
    """Measured in a fresh process: the 12000 x 12000 PNG adds no memory (826 MB before)."""
    for mode in codec.OVERSIZE_MODES:
        done = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, issue_png, mode],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        kind, grown_mb = done.stdout.split()
        assert kind == "oversize" and int(grown_mb) < 20, done.stdout


def test_header_crafted_jpeg_claiming_12000x12000(no_decoding):
    segments, rest = jpeg_segments(encode(smooth_rgb(16, 16), ".jpg"))
    patched = [
        s[:5] + struct.pack(">HH", 12000, 12000) + s[9:] if s[1] == 0xC0 else s for s in segments
    ]
    data = b"\xff\xd8" + b"".join(patched) + rest
    header = header_of(data)
    assert (header.width, header.height, header.what) == (12000, 12000, "baseline JPEG")
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "jpeg"), max_pixels=3840 * 2160)
    assert err.value.kind == "oversize" and "12000x12000" in str(err.value)
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "jpeg"), max_pixels=1000, oversize="downscale")
    assert err.value.kind == "oversize" and "even at 1/8 scale (1500x1500)" in str(err.value)


@pytest.mark.parametrize(
    "marker,what,reducible",
    [
        (0xC0, "baseline", True),
        (0xC1, "extended sequential", True),
        (0xC2, "progressive", False),
        (0xC3, "lossless", False),
        (0xC5, "hierarchical sequential", False),
        (0xC6, "hierarchical progressive", False),
        (0xC7, "hierarchical lossless", False),
        (0xC9, "arithmetic sequential", True),
        (0xCA, "arithmetic progressive", False),
        (0xCB, "arithmetic lossless", False),
        (0xCD, "arithmetic hierarchical sequential", False),
        (0xCE, "arithmetic hierarchical progressive", False),
        (0xCF, "arithmetic hierarchical lossless", False),
    ],
)
def test_header_every_sof_marker(marker, what, reducible):
    header = header_of(crafted_jpeg(segment(0xE0, b"JFIF\x00"), sof(marker, 4000, 3000), sos(3)))
    assert (header.width, header.height) == (4000, 3000)
    assert header.what == f"{what} JPEG" and header.reducible is reducible


def test_header_not_sof_markers_are_skipped():
    """DHT (C4), JPG (C8) and DAC (CC) sit in the SOF range but are not frame headers."""
    decoys = [segment(m, struct.pack(">BHHB", 8, 9999, 9999, 3)) for m in (0xC4, 0xC8, 0xCC)]
    header = header_of(crafted_jpeg(*decoys, sof(0xC0, 640, 480), sos(3)))
    assert (header.width, header.height) == (640, 480)


def test_header_multi_scan_sequential_is_not_reducible():
    """A sequential JPEG whose first scan lacks components buffers the whole image in libjpeg."""
    assert header_of(crafted_jpeg(sof(0xC0, 64, 48, 3), sos(3))).reducible
    assert not header_of(crafted_jpeg(sof(0xC0, 64, 48, 3), sos(1))).reducible
    assert header_of(crafted_jpeg(sof(0xC0, 64, 48, 1), sos(1))).reducible


def test_header_fill_bytes_stray_bytes_and_standalone_markers():
    """What libjpeg tolerates between segments, the scan tolerates the same way."""
    rgb = smooth_rgb(37, 53)
    data = encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    plain = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    segments, rest = jpeg_segments(data)
    variants = {
        "fill": [b"\xff" * 5 + s for s in segments] + [b"\xff\xff" + rest],
        "stray": segments[:1] + [b"junk" + s for s in segments[1:]] + [b"\x00\x01" + rest],
        "stuffed": [b"\xff\x00" + s for s in segments] + [rest],
        "standalone": [b"\xff\x01\xff\xd3" + s for s in segments] + [rest],
    }
    for name, parts in variants.items():
        variant = b"\xff\xd8" + b"".join(parts)
        header = header_of(variant)
        assert (header.width, header.height) == (53, 37), name
        decoded = cv2.imdecode(np.frombuffer(variant, np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(decoded, plain, err_msg=name)  # libjpeg reads it the same
        np.testing.assert_array_equal(
            compressed_to_rgb(compressed_msg(variant, "jpeg")), plain[..., ::-1]
        )


def test_header_after_a_long_exif_block():
    """Segments past the first 64 KB (large EXIF / ICC data) are followed to the frame header."""
    data = encode(smooth_rgb(37, 53), ".jpg")
    app = b"".join(segment(0xE1, bytes([i]) * 60_000) for i in range(3))
    long_header = data[:2] + app + data[2:]
    header = header_of(long_header)
    assert (header.width, header.height) == (53, 37)
    assert decoded_shape(long_header) == (37, 53)
    with pytest.raises(codec._BadHeader, match="ends inside its header"):
        header_of(long_header[:150_000])


def test_header_truncated_jpeg(no_decoding):
    data = encode(smooth_rgb(37, 53), ".jpg")
    scan = data.index(b"\xff\xda")
    for cut in range(3, scan + 5):  # SOS: marker, length, component count
        with pytest.raises(ImageDecodeError) as err:
            compressed_to_rgb(compressed_msg(data[:cut], "jpeg"))
        assert err.value.kind == "corrupt"
        assert "not valid jpeg data" in str(err.value)
        assert "ends inside its header" in str(err.value), cut
    assert header_of(data[: scan + 5]).width == 53


@pytest.mark.parametrize(
    "parts,kind,why",
    [
        ((b"\xff\xd8", sof(0xC0, 8, 8), sos(3)), "corrupt", "second start-of-image"),
        ((segment(0xE0, b"JFIF"), b"\xff\xd9"), "corrupt", "ends (EOI)"),
        ((sos(3), sof(0xC0, 8, 8)), "corrupt", "scan before any frame header"),
        ((b"\xff\xe0\x00\x01", sof(0xC0, 8, 8), sos(3)), "corrupt", "segment length of 1"),
        ((sof(0xC0, 8, 8), sof(0xC2, 9, 9), sos(3)), "corrupt", "two frame headers"),
        ((sof(0xC0, 8, 0), sos(3)), "corrupt", "size of 8x0"),
        ((segment(0xC0, b"\x08\x00"), sos(3)), "corrupt", "frame header has a length of 4"),
        ((segment(0xF7, b"\x08\x00\x08\x00\x08\x01"), sos(1)), "unsupported_format", "JPEG-LS"),
    ],
)
def test_header_bad_jpeg(no_decoding, parts, kind, why):
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(crafted_jpeg(*parts), ""))
    assert err.value.kind == kind and why in str(err.value), str(err.value)


OTHER_FORMATS = {
    ".bmp": "BMP",
    ".tiff": "TIFF",
    ".webp": "WebP",
    ".ppm": "PNM",
    ".pbm": "PNM",
    ".pam": "PNM",
    ".pfm": "PNM",
    ".hdr": "Radiance HDR",
    ".ras": "Sun raster",
    ".avif": "AVIF/HEIF",
    ".gif": "GIF",
    ".jp2": "JPEG 2000",
    ".exr": "OpenEXR",
}


@pytest.mark.parametrize("ext,name", OTHER_FORMATS.items())
def test_other_image_formats_are_rejected_before_decoding(monkeypatch, ext, name):
    """OpenCV would decode BMP, TIFF, WebP...: the contract says jpeg and png only."""
    rgb = random_rgb(16, 16)
    image = rgb.astype(np.float32) / 255 if ext in (".pfm", ".hdr", ".exr") else rgb
    image = image[..., 0] if ext == ".pbm" else image  # bilevel: one channel
    try:
        ok, buf = cv2.imencode(ext, image)
    except cv2.error:
        ok = False
    data = buf.tobytes() if ok else None
    if data is None:  # no writer in this OpenCV build: the signature alone
        data = {
            ".jp2": b"\x00\x00\x00\x0cjP  \r\n\x87\n",
            ".exr": b"v/1\x01\x02\x00\x00\x00",
        }.get(ext, b"")
        if not data:
            pytest.skip(f"OpenCV cannot write {ext}")
        data += bytes(64)

    def imdecode(*args, **kwargs):
        raise AssertionError("cv2.imdecode was called")

    monkeypatch.setattr(cv2, "imdecode", imdecode)
    for fmt in ("png", "jpeg", "rgb8; jpeg compressed bgr8", ""):
        with pytest.raises(ImageDecodeError) as err:
            compressed_to_rgb(compressed_msg(data, fmt))
        assert err.value.kind == "unsupported_format"
        assert f"holds {name} data" in str(err.value) and "supported: jpeg, png" in str(err.value)


@pytest.mark.parametrize(
    "data", [b"\x00" * 64, b"not an image", b"\xff\xd8\x00\xff\xc0", b"\x89PNG\r\n", b"G"]
)
def test_unknown_bytes_are_corrupt_without_decoding(no_decoding, data):
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "jpeg"))
    assert err.value.kind == "corrupt"
    assert "neither the JPEG nor the PNG signature" in str(err.value)


# --- compressed frames: limits and downscaling ---------------------------------------------


def block_mean(rgb: np.ndarray, size: int) -> np.ndarray:
    """Means of size x size blocks, the image extended by its edge (libjpeg's DCT scaling)."""
    height, width = rgb.shape[:2]
    padded_h, padded_w = -(-height // size) * size, -(-width // size) * size
    pad = ((0, padded_h - height), (0, padded_w - width), (0, 0))
    padded = np.pad(rgb.astype(np.float64), pad, mode="edge")
    return padded.reshape(padded_h // size, size, padded_w // size, size, 3).mean(axis=(1, 3))


@pytest.mark.parametrize(
    "height,width,max_pixels,denominator",
    [
        (480, 640, 480 * 640, 1),
        (480, 640, 480 * 640 - 1, 2),
        (480, 640, 240 * 320, 2),
        (480, 640, 240 * 320 - 1, 4),
        (480, 640, 120 * 160 - 1, 8),
        (480, 640, 60 * 80, 8),
        (481, 641, 241 * 321, 2),
        (481, 641, 61 * 81, 8),
        (37, 53, 100, 8),
    ],
)
def test_jpeg_downscale_decodes_at_the_least_reduction_that_fits(
    height, width, max_pixels, denominator
):
    rgb = smooth_rgb(height, width)
    data = encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    # The data decides the codec, so a JPEG labelled png is still decoded as JPEG.
    msg = compressed_msg(data, "png")
    out = compressed_to_rgb(msg, max_pixels=max_pixels, oversize="downscale")
    out_h, out_w = -(-height // denominator), -(-width // denominator)
    assert out.shape == (out_h, out_w, 3) and out.flags.c_contiguous
    assert out_h * out_w <= max_pixels
    diff = np.abs(out - block_mean(rgb, denominator))
    assert diff.mean() < 1.5 and diff.max() <= 16, (diff.mean(), diff.max())
    # Channel order: red rises left to right, green top to bottom.
    assert out[out_h // 2, -1, 0] > 180 and out[out_h // 2, 0, 0] < 60
    assert out[-1, out_w // 2, 1] > 180 and out[0, out_w // 2, 1] < 60
    if denominator > 1:
        with pytest.raises(ImageDecodeError) as err:
            compressed_to_rgb(msg, max_pixels=max_pixels)  # oversize="reject"
        assert err.value.kind == "oversize"
        assert f"baseline JPEG of {width}x{height}" in str(err.value)


def test_jpeg_downscale_without_imread_color_rgb(monkeypatch):
    monkeypatch.setattr(codec, "_IMREAD_RGB", None)
    rgb = smooth_rgb(48, 64)
    data = encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    for max_pixels, shape in ((0, (48, 64, 3)), (24 * 32, (24, 32, 3))):
        out = compressed_to_rgb(
            compressed_msg(data, "jpeg"), max_pixels=max_pixels, oversize="downscale"
        )
        assert out.shape == shape and out[24 * shape[0] // 48, -1, 0] > 180


def test_progressive_jpeg_over_the_limit_is_rejected_even_in_downscale_mode(no_decoding):
    """libjpeg keeps every coefficient of a progressive image in memory, whatever the scale."""
    data = encode(smooth_rgb(48, 64), ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "jpeg"), max_pixels=1000, oversize="downscale")
    assert err.value.kind == "oversize"
    assert "progressive JPEG of 64x48" in str(err.value)
    assert "cannot be decoded at reduced size" in str(err.value)


def test_progressive_jpeg_within_the_limit_decodes():
    rgb = smooth_rgb(48, 64)
    data = encode(rgb, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 95)
    out = compressed_to_rgb(compressed_msg(data, "jpeg"), max_pixels=48 * 64, oversize="downscale")
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 2


def test_png_within_the_limit_decodes_exactly():
    rgb = random_rgb(48, 64, seed=3)
    for mode in codec.OVERSIZE_MODES:
        out = compressed_to_rgb(
            compressed_msg(encode(rgb, ".png"), "png"), max_pixels=48 * 64, oversize=mode
        )
        np.testing.assert_array_equal(out, rgb)


def test_decoded_image_larger_than_its_header_is_rejected(monkeypatch):
    """Should the decoder ever read a size other than the header scan did, the frame is refused."""
    data = encode(smooth_rgb(48, 64), ".jpg")
    monkeypatch.setattr(codec, "_imdecode_rgb", lambda buf, d: np.zeros((49, 64, 3), np.uint8))
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "jpeg"))
    assert err.value.kind == "corrupt"
    assert "decoded to 64x49 but its header declares 64x48" in str(err.value)
    monkeypatch.setattr(codec, "_imdecode_rgb", lambda buf, d: np.zeros((13, 16, 3), np.uint8))
    with pytest.raises(ImageDecodeError, match="decoded to 16x13 at 1/4 scale") as err:
        compressed_to_rgb(compressed_msg(data, "jpeg"), max_pixels=200, oversize="downscale")
    assert err.value.kind == "corrupt"


def test_decoder_errors_are_one_short_line(monkeypatch):
    data = encode(smooth_rgb(8, 8), ".png")

    def raises(text):
        def imdecode(buf, denominator):
            raise cv2.error(text)

        return imdecode

    monkeypatch.setattr(codec, "_imdecode_rgb", raises("OpenCV(5.0) x.cpp:1: error:\n" * 50))
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "png"))
    assert err.value.kind == "corrupt" and "\n" not in str(err.value)
    assert len(str(err.value)) < 250
    limit_text = "(-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS"
    monkeypatch.setattr(codec, "_imdecode_rgb", raises(limit_text))
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "png"))
    assert err.value.kind == "oversize"


def test_opencv_limits_are_checked_before_decoding(monkeypatch, no_decoding):
    """OpenCV's own size limits apply with max_pixels 0, reported as oversize, not corrupt."""
    png = encode(random_rgb(20, 30), ".png")
    monkeypatch.setattr(codec, "_CV_MAX_PIXELS", 599)
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(png, "png"))
    assert err.value.kind == "oversize" and "OPENCV_IO_MAX_IMAGE" in str(err.value)
    monkeypatch.setattr(codec, "_CV_MAX_PIXELS", 1 << 30)
    monkeypatch.setattr(codec, "_CV_MAX_WIDTH", 29)
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(png, "png"))
    assert err.value.kind == "oversize"


@pytest.mark.parametrize(
    "value,expected",
    [("", 77), ("1000", 1000), ("4MB", 4 << 20), ("2kb", 2048), ("3Mb", 3 << 20),
     ("1 MB", 77), ("-5", 77), ("1GB", 77), ("x", 77)],
)  # fmt: skip
def test_opencv_limit_settings_are_parsed_as_opencv_does(monkeypatch, value, expected):
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", value)
    assert codec._env_size("OPENCV_IO_MAX_IMAGE_PIXELS", 77) == expected


ENV_LIMIT_SCRIPT = """
import cv2, numpy as np
from sensor_msgs.msg import CompressedImage
from ovseg_ros.ros import codec

assert codec._CV_MAX_PIXELS == 4096, codec._CV_MAX_PIXELS

def decode(ext, size, **kwargs):
    msg = CompressedImage()
    msg.data = cv2.imencode(ext, np.full((size, size, 3), 128, np.uint8))[1].tobytes()
    try:
        return codec.compressed_to_rgb(msg, **kwargs).shape[:2]
    except codec.ImageDecodeError as exc:
        return exc.kind

print(decode(".png", 64), decode(".png", 65), decode(".jpg", 65))
# OpenCV checks the scaled size of a JPEG decoded reduced, so downscaling works under its limit.
print(decode(".jpg", 250, max_pixels=4096, oversize="downscale"))
"""


def test_opencv_limit_from_the_environment():
    """OPENCV_IO_MAX_IMAGE_PIXELS set for the process is honoured (and reported as oversize)."""
    env = dict(os.environ, OPENCV_IO_MAX_IMAGE_PIXELS="4096")
    done = subprocess.run(
        [sys.executable, "-c", ENV_LIMIT_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["(64, 64) oversize oversize", "(63, 63)"]


FUZZ_SCRIPT = """
import sys
import cv2, numpy as np
from ovseg_ros.ros import codec

rng = np.random.default_rng(int(sys.argv[1]))
image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
bases = [
    cv2.imencode(".jpg", image)[1].tobytes(),
    cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
    cv2.imencode(".jpg", image[..., 0])[1].tobytes(),
]
agree = disagree = stricter = 0
for i in range(int(sys.argv[2])):
    data = bytearray(bases[i % 3])
    end = data.find(b"\\xff\\xda") + 12
    for _ in range(int(rng.integers(1, 4))):
        at, op = int(rng.integers(2, end)), int(rng.integers(0, 3))
        byte = int(rng.choice([0xFF, 0x00, 0xD0, 0xC0, 0xC2, 0xDA, 0xD9, int(rng.integers(256))]))
        if op == 0:
            data[at] = byte
        elif op == 1:
            data.insert(at, byte)
        else:
            del data[at]
    buf = np.frombuffer(bytes(data), np.uint8)
    try:
        header = codec._read_header(buf)
        ours = (header.height, header.width)
    except codec._BadHeader:
        ours = None
    try:
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR | codec._IGNORE_ORIENTATION)
    except cv2.error:
        decoded = None
    if decoded is None:
        continue
    if ours is None:
        stricter += 1
    elif decoded.shape[:2] == ours:
        agree += 1
    else:
        disagree += 1
print(agree, disagree, stricter)
"""


def test_header_scan_agrees_with_libjpeg_on_mutated_headers():
    """Random byte edits in JPEG headers: whatever libjpeg decodes has the size the scan found.

    Run in a process of its own with OpenCV's pixel limit lowered, since a mutated size field
    could otherwise make libjpeg allocate gigabytes.
    """
    env = dict(os.environ, OPENCV_IO_MAX_IMAGE_PIXELS="1000000")
    done = subprocess.run(
        [sys.executable, "-c", FUZZ_SCRIPT, "7", "1500"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    agree, disagree, stricter = map(int, done.stdout.split())
    assert disagree == 0 and agree > 300
    assert stricter <= 5  # e.g. an APPn length below 2, which libjpeg skips over and we refuse
