"""Helpers shared by the tests of the sample camera (ovseg_ros.ros.camera and sample_camera):
a vocabulary message, label images of known class shares, plain frames and headers."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from builtin_interfaces.msg import Time
from std_msgs.msg import Header

VOCAB_V1 = json.dumps(
    {
        "version": 1,
        "unlabeled": 255,
        "classes": [
            {"id": 0, "name": "person", "synonyms": [], "color": [255, 0, 0]},
            {"id": 1, "name": "car", "synonyms": ["automobile"], "color": [0, 255, 0]},
            {"id": 2, "name": "dog", "synonyms": [], "color": [0, 0, 255]},
        ],
    }
)


def header(sec: int = 1700000000, nanosec: int = 5) -> Header:
    return Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id="camera")


def write_png(path: Path, rgb: np.ndarray) -> None:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def solid(height: int, width: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.full((height, width, 3), rgb, np.uint8)


def known_labels(height: int = 10, width: int = 10) -> np.ndarray:
    """34 % person (0), 12 % car (1), 5 % id 7 (not in the vocabulary), the rest unlabeled."""
    n = height * width
    person, car, unknown = round(0.34 * n), round(0.12 * n), round(0.05 * n)
    labels = np.full(n, 255, np.uint8)
    labels[:person] = 0
    labels[person : person + car] = 1
    labels[person + car : person + car + unknown] = 7
    return labels.reshape(height, width)
