"""Tests for decoding sensor_msgs/Image to numpy (no rclpy node, no rclpy.init()): every
encoding, the rejections and their kinds, size limits, msg_to_array and cv_bridge.

Every input message is built here from raw bytes laid out by hand (channel order, alpha, 16-bit
byte order, UYVY / YUYV packing, row padding filled with junk), so the decoder is checked against
the encoding definitions rather than against itself.
"""

import array

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from codecutil import encode, random_rgb
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from ovseg_ros.ros import decode
from ovseg_ros.ros.decode import (
    OVERSIZE_MODES,
    SUPPORTED_ENCODINGS,
    ImageDecodeError,
    cv_bridge_available,
    image_to_rgb,
    msg_to_array,
)
from ovseg_ros.ros.decode_compressed import compressed_to_rgb

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


# --- msg_to_array --------------------------------------------------------------------------


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

    monkeypatch.setattr(decode, "_BRIDGE", FakeBridge())
    monkeypatch.setattr(decode, "_BRIDGE_CHECKED", True)
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
    kinds = decode.REJECTION_KINDS
    assert set(kinds) == {case[1] for case in REJECTIONS}  # every kind is reachable and tested
    for kind, description in kinds.items():
        assert kind.isidentifier() and kind == kind.lower() and len(kind) <= 20
        assert description and "\n" not in description and len(description) <= 100
    assert "REJECTION_KINDS" in decode.__all__
    assert decode.ImageDecodeError("x", kind="corrupt").kind == "corrupt"
    with pytest.raises(ValueError, match="unknown rejection kind"):
        decode.ImageDecodeError("x", kind="weird")


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
    assert err.value.kind in decode.REJECTION_KINDS


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

    monkeypatch.setattr(decode, "_buffer", touched)
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
    for mode in OVERSIZE_MODES:
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
    assert height * width <= 30 and (width, height) == decode._fit(13, 7, 30)
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
    new_w, new_h = decode._fit(width, height, max_pixels)
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
