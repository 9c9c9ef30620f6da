"""Tests for the sensor_msgs <-> numpy conversions (no rclpy node, no rclpy.init()).

Every input message is built here from raw bytes laid out by hand (channel order, alpha, 16-bit
byte order, UYVY / YUYV packing, row padding filled with junk), so the decoder is checked against
the encoding definitions rather than against itself.
"""

import array
import struct

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
    "rgb8": 3, "bgr8": 3, "8UC3": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "8UC1": 1,
    "mono16": 2, "16UC1": 2, "yuv422": 2, "uyvy": 2, "yuv422_yuy2": 2, "yuyv": 2,
}  # fmt: skip
PAD_BYTE = 0xA5  # fills row padding: any leak into the result shows up as wrong pixels
# Where cv_bridge's own rgb8 conversion equals ours (mono16: it rounds 255/65535 instead of >> 8;
# 8UC1 / 8UC3 / 16UC1: it refuses to colour-convert generic types; uyvy / yuyv: newer names).
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
    if encoding in ("bgr8", "8UC3"):
        return rgb[..., ::-1].reshape(height, -1), rgb, 0
    if encoding in ("rgba8", "bgra8"):
        color = rgb if encoding == "rgba8" else rgb[..., ::-1]
        alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
        return np.concatenate([color, alpha], axis=-1).reshape(height, -1), rgb, 0
    if encoding in ("mono8", "8UC1"):
        gray = rgb[..., 0]
        return gray, np.repeat(gray[..., None], 3, axis=-1), 0
    if encoding in ("mono16", "16UC1"):
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


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
@pytest.mark.parametrize("pad", [0, 3])
def test_sixteen_bit_big_endian(encoding, pad):
    raw, expected, _ = build(encoding, 7, 13, seed=5, big_endian=True)
    out = image_to_rgb(image_msg(encoding, raw, 13, pad=pad, big_endian=True))
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
    np.testing.assert_array_equal(image_to_rgb(image_msg("8uc3", raw, 13)), expected)


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
