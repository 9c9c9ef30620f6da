"""Tests of the messages the sample camera publishes: every encoding, JPEG, camera info, and the
numpy 4:2:2 encoder used with older OpenCV."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from camerautil import header

from ovseg_ros.ros.camera.messages import frame_to_compressed, frame_to_msg, pinhole_camera_info
from ovseg_ros.ros.decode import image_to_rgb
from ovseg_ros.ros.decode_compressed import compressed_to_rgb


def smooth_rgb(height: int = 24, width: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 90)], axis=-1
    ).astype(np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_frame_to_msg_colour_encodings_are_exact(encoding):
    rgb = smooth_rgb()
    msg = frame_to_msg(rgb, encoding, header())
    assert (msg.encoding, msg.width, msg.height) == (encoding, 32, 24)
    assert msg.step == 32 * len(encoding.rstrip("8"))
    assert msg.header.stamp.sec == 1700000000 and msg.header.frame_id == "camera"
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


def test_frame_to_msg_gray_and_yuv():
    rgb = smooth_rgb()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(image_to_rgb(frame_to_msg(rgb, "mono8", header()))[..., 0], gray)
    mono16 = frame_to_msg(rgb, "mono16", header())
    assert mono16.step == 64 and mono16.is_bigendian == 0
    np.testing.assert_array_equal(image_to_rgb(mono16)[..., 1], gray)
    for encoding in ("yuv422", "yuv422_yuy2"):
        msg = frame_to_msg(rgb, encoding, header())
        diff = np.abs(image_to_rgb(msg).astype(int) - rgb.astype(int))
        assert msg.step == 64 and diff.mean() < 4, encoding
        odd = frame_to_msg(rgb[:, :31], encoding, header())
        assert odd.width == 30  # 4:2:2 needs an even width
    with pytest.raises(ValueError, match="unsupported encoding"):
        frame_to_msg(rgb, "bayer_rggb8", header())


def test_frame_to_compressed():
    rgb = smooth_rgb(48, 64)
    msg = frame_to_compressed(rgb, header(), quality=95)
    assert msg.format == "rgb8; jpeg compressed bgr8"
    assert msg.header.stamp.nanosec == 5
    out = compressed_to_rgb(msg)
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb.astype(int)).mean() < 3
    gray = frame_to_compressed(rgb, header(), encoding="mono8")
    assert gray.format == "mono8; jpeg compressed mono8"
    assert compressed_to_rgb(gray).shape == rgb.shape


def test_pinhole_camera_info():
    info = pinhole_camera_info(640, 480, header(), hfov_deg=90.0)
    assert (info.width, info.height, info.header.frame_id) == (640, 480, "camera")
    k = np.asarray(info.k).reshape(3, 3)
    assert k[0, 0] == pytest.approx(320.0) and k[1, 1] == pytest.approx(320.0)  # tan(45) = 1
    assert (k[0, 2], k[1, 2], k[2, 2]) == (319.5, 239.5, 1.0)
    p = np.asarray(info.p).reshape(3, 4)
    np.testing.assert_allclose(p[:, :3], k)
    assert info.distortion_model == "plumb_bob" and list(info.d) == [0.0] * 5
    default = pinhole_camera_info(640, 480, header())
    assert 45.0 < math.degrees(2 * math.atan(320 / default.k[0])) < 75.0


def test_yuv422_fallback_matches_what_opencv_decodes():
    """The numpy 4:2:2 encoder used with OpenCV < 4.7 round-trips through OpenCV's decoder."""
    from ovseg_ros.ros.camera.messages import _rgb_to_yuv422

    rgb = smooth_rgb()
    for uyvy, code in ((True, cv2.COLOR_YUV2RGB_UYVY), (False, cv2.COLOR_YUV2RGB_YUY2)):
        packed = _rgb_to_yuv422(rgb, uyvy)
        assert packed.shape == (*rgb.shape[:2], 2) and packed.dtype == np.uint8
        back = cv2.cvtColor(packed, code)
        assert np.abs(back.astype(int) - rgb.astype(int)).mean() < 4
        if hasattr(cv2, "COLOR_RGB2YUV_UYVY"):  # OpenCV >= 4.7: the same bytes within rounding
            ref = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_UYVY if uyvy else cv2.COLOR_RGB2YUV_YUY2)
            assert np.abs(ref.astype(int) - packed.astype(int)).max() <= 2
