"""Tests for the bundled sample photos."""

import socket

import numpy as np
import pytest

from ovseg_ros import samples
from ovseg_ros.samples import SAMPLE_VOCABULARY, sample_images, to_rgb_uint8


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to open a network connection fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("sample images must load without network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_samples_are_rgb_uint8_and_load_offline(no_network):
    images = sample_images()
    assert len(images) >= 4
    names = [name for name, _ in images]
    assert len(set(names)) == len(names)
    for name, image in images:
        assert isinstance(name, str) and name
        assert image.dtype == np.uint8, name
        assert image.ndim == 3 and image.shape[2] == 3, (name, image.shape)
        assert image.shape[0] >= 64 and image.shape[1] >= 64, (name, image.shape)
        assert image.flags["C_CONTIGUOUS"], name
        # Real photos, not blank placeholders.
        assert image.std() > 10, name


def test_expected_samples_present():
    names = {name for name, _ in sample_images()}
    assert {"astronaut", "chelsea", "coffee", "rocket", "motorcycle_left"} <= names


def test_motorcycle_is_left_colour_view():
    images = dict(sample_images())
    import skimage.data

    left, right, _ = skimage.data.stereo_motorcycle()
    np.testing.assert_array_equal(images["motorcycle_left"], left)
    assert not np.array_equal(images["motorcycle_left"], right)


def test_sample_vocabulary_is_nonempty_unique_strings():
    assert len(SAMPLE_VOCABULARY) >= 4
    assert all(isinstance(entry, str) and entry.strip() for entry in SAMPLE_VOCABULARY)
    assert len(set(SAMPLE_VOCABULARY)) == len(SAMPLE_VOCABULARY)
    # Every sample photo's main subject is named somewhere in the vocabulary.
    words = " ".join(SAMPLE_VOCABULARY)
    for subject in ("astronaut", "cat", "cup", "rocket", "motorcycle"):
        assert subject in words


def test_sample_images_returns_fresh_arrays():
    first = dict(samples.sample_images())
    first["astronaut"][:] = 0
    second = dict(samples.sample_images())
    assert second["astronaut"].any()


@pytest.mark.parametrize(
    ("image", "expected_first_pixel"),
    [
        (np.full((4, 5), 7, np.uint8), (7, 7, 7)),
        (np.dstack([np.full((4, 5), 9, np.uint8), np.full((4, 5), 200, np.uint8)]), (9, 9, 9)),
        (np.dstack([np.full((4, 5), c, np.uint8) for c in (1, 2, 3, 4)]), (1, 2, 3)),
        (np.dstack([np.full((4, 5), c, np.uint8) for c in (10, 20, 30)]), (10, 20, 30)),
        (np.full((4, 5), 1.0, np.float64), (255, 255, 255)),
    ],
)
def test_to_rgb_uint8_converts_gray_alpha_and_float(image, expected_first_pixel):
    rgb = to_rgb_uint8(image)
    assert rgb.shape == (4, 5, 3)
    assert rgb.dtype == np.uint8
    assert tuple(int(v) for v in rgb[0, 0]) == expected_first_pixel


def test_to_rgb_uint8_rejects_unknown_shapes():
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((2, 2, 5), np.uint8))
