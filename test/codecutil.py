"""Helpers shared by the tests of the image conversions (decode, decode_compressed, encode):
test images and compressed messages."""

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage


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


def compressed_msg(data: bytes, fmt: str) -> CompressedImage:
    msg = CompressedImage(format=fmt)
    msg.data = data
    return msg


def encode(rgb: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]), list(params))
    assert ok
    return buf.tobytes()
