"""Sample photos that ship inside scikit-image, for demos that must run without a network."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import skimage.data

from .engine.config import DEFAULT_VOCABULARY

# The engine's default vocabulary was chosen to fit these photos; "a; b" lists synonyms.
SAMPLE_VOCABULARY: list[str] = list(DEFAULT_VOCABULARY)


def _motorcycle_left() -> np.ndarray:
    left, _right, _disparity = skimage.data.stereo_motorcycle()
    return left


# Each of these reads an image file bundled in the scikit-image wheel (no download).
_SAMPLES: list[tuple[str, Callable[[], np.ndarray]]] = [
    ("astronaut", skimage.data.astronaut),
    ("chelsea", skimage.data.chelsea),
    ("coffee", skimage.data.coffee),
    ("rocket", skimage.data.rocket),
    ("motorcycle_left", _motorcycle_left),
]


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a gray, gray+alpha, RGB or RGBA image to contiguous HxWx3 uint8 RGB."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating):
            image = np.clip(np.rint(image * 255.0), 0, 255)
        image = image.astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    elif image.ndim == 3 and image.shape[2] == 2:
        image = np.repeat(image[:, :, :1], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"cannot convert an image of shape {image.shape} to RGB")
    return np.ascontiguousarray(image)


def sample_images() -> list[tuple[str, np.ndarray]]:
    """Return the bundled sample photos as (name, HxWx3 uint8 RGB) pairs."""
    return [(name, to_rgb_uint8(load())) for name, load in _SAMPLES]
