"""Tests for the palette, label colouring, overlays and legends."""

import numpy as np
import pytest

from ovseg_ros.viz import (
    class_colors,
    class_counts,
    colorize,
    counts_of_classes,
    legend_entries,
    overlay,
    palette,
    unlabeled_value,
)

# The PASCAL VOC colour map as published with the dataset (background + 20 classes).
VOC_COLORS = [
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128),
    (0, 128, 128), (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0),
    (64, 0, 128), (192, 0, 128), (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0),
    (0, 192, 0), (128, 192, 0), (0, 64, 128),
]  # fmt: skip


def gradient_image(height: int, width: int) -> np.ndarray:
    """A deterministic RGB image with varied pixels."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)


# --- palette -------------------------------------------------------------------------------


def test_palette_starts_with_voc_colours():
    colors = palette(21)
    assert colors.shape == (21, 3)
    assert colors.dtype == np.uint8
    assert [tuple(int(v) for v in c) for c in colors] == VOC_COLORS
    assert tuple(colors[1]) == (128, 0, 0)
    assert tuple(colors[15]) == (192, 128, 128)


def test_palette_is_deterministic_and_prefix_stable():
    np.testing.assert_array_equal(palette(50), palette(50))
    # Adding classes never changes the colours of existing ones.
    np.testing.assert_array_equal(palette(300)[:50], palette(50))


def test_palette_colours_are_distinct_beyond_voc():
    colors = palette(1000)
    assert len({tuple(c) for c in colors.tolist()}) == 1000
    # The same bit-interleaving formula continues: 21 = 0b010101 -> r bit 7, b bit 7, g bit 6.
    assert tuple(int(v) for v in palette(22)[21]) == (128, 64, 128)


def test_palette_empty_and_invalid():
    assert palette(0).shape == (0, 3)
    with pytest.raises(ValueError):
        palette(-1)


# --- colorize ------------------------------------------------------------------------------


def test_colorize_uint8_with_unlabeled():
    colors = palette(4)
    labels = np.array([[0, 1], [3, 255]], np.uint8)
    out = colorize(labels, colors, unlabeled_color=(9, 8, 7))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], colors[0])
    np.testing.assert_array_equal(out[0, 1], colors[1])
    np.testing.assert_array_equal(out[1, 0], colors[3])
    np.testing.assert_array_equal(out[1, 1], (9, 8, 7))


def test_colorize_uint16_with_unlabeled_and_many_classes():
    colors = palette(400)
    labels = np.array([[0, 300, 65535], [399, 255, 65535]], np.uint16)
    out = colorize(labels, colors)
    np.testing.assert_array_equal(out[0, 1], colors[300])
    np.testing.assert_array_equal(out[1, 0], colors[399])
    # 255 is an ordinary class in uint16 maps; only 65535 is unlabeled.
    np.testing.assert_array_equal(out[1, 1], colors[255])
    np.testing.assert_array_equal(out[0, 2], (0, 0, 0))
    np.testing.assert_array_equal(out[1, 2], (0, 0, 0))


def test_colorize_default_unlabeled_is_black():
    out = colorize(np.full((3, 3), 255, np.uint8), palette(2))
    assert not out.any()


def test_colorize_rejects_too_few_colours_and_bad_dtypes():
    with pytest.raises(ValueError, match="class 5"):
        colorize(np.array([[5]], np.uint8), palette(3))
    with pytest.raises(TypeError, match="uint8"):
        colorize(np.array([[1]], np.int32), palette(3))
    with pytest.raises(ValueError, match="HxW"):
        colorize(np.zeros((2, 2, 1), np.uint8), palette(3))


def test_unlabeled_value():
    assert unlabeled_value(np.zeros((1, 1), np.uint8)) == 255
    assert unlabeled_value(np.zeros((1, 1), np.uint16)) == 65535


# --- legend entries ------------------------------------------------------------------------


def test_legend_entries_sorted_by_area_with_fractions():
    labels = np.full((10, 10), 255, np.uint8)
    labels[:5] = 2  # 50 %
    labels[5:7] = 0  # 20 %
    labels[7, :3] = 1  # 3 %
    entries = legend_entries(labels, ["sky", "car", "road", "tree"])
    assert [(i, n) for i, n, _ in entries] == [(2, "road"), (0, "sky"), (1, "car")]
    assert [f for _, _, f in entries] == pytest.approx([0.5, 0.2, 0.03])


def test_legend_entries_ties_in_class_order_and_missing_names():
    labels = np.array([[3, 1], [3, 1]], np.uint16)
    entries = legend_entries(labels, ["a", "b"])
    assert entries == [(1, "b", 0.5), (3, "class 3", 0.5)]


def test_legend_entries_empty_when_all_unlabeled():
    assert legend_entries(np.full((4, 4), 255, np.uint8), ["a"]) == []


# --- overlay -------------------------------------------------------------------------------


def half_labelled(height: int, width: int) -> np.ndarray:
    labels = np.full((height, width), 255, np.uint8)
    labels[:, : width // 2] = 1
    labels[height // 2 :, width // 2 :] = 2
    return labels


def test_overlay_alpha_zero_returns_the_image():
    rgb = gradient_image(120, 160)
    out = overlay(rgb, half_labelled(120, 160), palette(3), alpha=0.0)
    np.testing.assert_array_equal(out, rgb)
    assert out is not rgb


def test_overlay_alpha_one_gives_pure_colours_and_keeps_unlabeled():
    rgb = gradient_image(120, 160)
    labels = half_labelled(120, 160)
    colors = palette(3)
    out = overlay(rgb, labels, colors, alpha=1.0)
    np.testing.assert_array_equal(out[labels == 1], np.broadcast_to(colors[1], (60 * 160, 3)))
    np.testing.assert_array_equal(out[labels == 2], np.broadcast_to(colors[2], (60 * 80, 3)))
    np.testing.assert_array_equal(out[labels == 255], rgb[labels == 255])


def test_overlay_half_alpha_blends():
    rgb = np.full((4, 4, 3), 100, np.uint8)
    labels = np.zeros((4, 4), np.uint8)
    colors = np.array([[200, 0, 50]], np.uint8)
    out = overlay(rgb, labels, colors, alpha=0.5)
    np.testing.assert_array_equal(out, np.broadcast_to([150, 50, 75], (4, 4, 3)))


def test_overlay_does_not_modify_inputs():
    rgb = gradient_image(50, 60)
    labels = half_labelled(50, 60)
    rgb_before, labels_before = rgb.copy(), labels.copy()
    overlay(rgb, labels, palette(3), alpha=0.7, names=["a", "b", "c"])
    np.testing.assert_array_equal(rgb, rgb_before)
    np.testing.assert_array_equal(labels, labels_before)


def test_legend_drawn_only_with_names_and_only_in_top_left_corner():
    height, width = 480, 640
    rgb = gradient_image(height, width)
    labels = half_labelled(height, width)
    colors = palette(3)
    plain = overlay(rgb, labels, colors, alpha=1.0)
    no_legend = overlay(rgb, labels, colors, alpha=1.0, names=["sky", "cat", "dog"], legend=False)
    np.testing.assert_array_equal(plain, no_legend)

    with_legend = overlay(rgb, labels, colors, alpha=1.0, names=["sky", "cat", "dog"])
    changed = np.any(with_legend != plain, axis=-1)
    assert changed.any(), "a legend should be drawn when names are given"
    rows, cols = np.nonzero(changed)
    # The legend is a compact box in the top-left corner.
    assert rows.min() < 20 and cols.min() < 20
    assert rows.max() < height // 3 and cols.max() < width // 3
    # Outside the legend box the labelled pixels are still pure class colours.
    outside = np.ones((height, width), bool)
    outside[: rows.max() + 1, : cols.max() + 1] = False
    np.testing.assert_array_equal(with_legend[outside], plain[outside])


def test_legend_lists_only_present_classes_with_their_colour_swatches():
    height, width = 480, 640
    rgb = np.full((height, width, 3), 255, np.uint8)  # white: the legend must stay readable
    labels = np.full((height, width), 255, np.uint8)
    labels[:, width // 2 :] = 4  # largest class first in the legend
    labels[height // 2 :, : width // 4] = 2
    colors = palette(6)
    names = [f"class-{i}" for i in range(6)]
    out = overlay(rgb, labels, colors, alpha=0.0, names=names)
    corner = out[: height // 3, : width // 3].reshape(-1, 3)
    present = {tuple(c) for c in corner.tolist()}
    assert tuple(colors[4].tolist()) in present
    assert tuple(colors[2].tolist()) in present
    for absent in (1, 3, 5):  # colours of classes not in the label map do not appear
        assert tuple(colors[absent].tolist()) not in present
    # A dark box behind the text keeps it readable on a white image, and the text is white.
    changed = np.any(out != rgb, axis=-1)
    rows, cols = np.nonzero(changed)
    box = out[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert np.median(box) < 128
    # Anti-aliased text peaks at 255 or a few levels below, depending on the OpenCV release
    # (253 with 4.14): near-white, brighter than the box (89 here) and the swatch borders (200).
    assert np.any(box.min(axis=-1) >= 230), "white text pixels expected in the legend"
    # Swatch order: class 4 (largest) is above class 2.
    rows4 = np.nonzero(np.all(out[: height // 3, : width // 3] == colors[4], axis=-1))[0]
    rows2 = np.nonzero(np.all(out[: height // 3, : width // 3] == colors[2], axis=-1))[0]
    assert rows4.max() < rows2.min()


def test_legend_grows_with_image_size():
    def legend_height(height, width):
        rgb = np.full((height, width, 3), 255, np.uint8)
        labels = np.zeros((height, width), np.uint8)
        plain = overlay(rgb, labels, palette(1), alpha=0.0)
        out = overlay(rgb, labels, palette(1), alpha=0.0, names=["thing"])
        return np.nonzero(np.any(out != plain, axis=-1))[0].max()

    assert legend_height(1080, 1920) > legend_height(480, 640)


@pytest.mark.parametrize(
    ("height", "width"), [(1, 1), (2, 3), (8, 8), (16, 300), (300, 16), (1080, 1920)]
)
def test_overlay_any_size_does_not_crash(height, width):
    rgb = gradient_image(height, width)
    labels = (np.arange(height * width) % 4).reshape(height, width).astype(np.uint16)
    names = ["a very long class name that will not fit in a narrow image", "b", "c", "d"]
    out = overlay(rgb, labels, palette(4), alpha=0.5, names=names)
    assert out.shape == (height, width, 3) and out.dtype == np.uint8


def test_tiny_image_skips_legend():
    rgb = np.full((1, 1, 3), 42, np.uint8)
    out = overlay(rgb, np.zeros((1, 1), np.uint8), palette(1), alpha=0.0, names=["x"])
    np.testing.assert_array_equal(out, rgb)


def test_overlay_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="does not match"):
        overlay(gradient_image(4, 4), np.zeros((4, 5), np.uint8), palette(1))
    with pytest.raises(ValueError, match="HxWx3"):
        overlay(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), palette(1))
    with pytest.raises(ValueError, match="alpha"):
        overlay(gradient_image(4, 4), np.zeros((4, 4), np.uint8), palette(1), alpha=1.5)


# --- counts given by the caller --------------------------------------------------------------


def blobs(height: int, width: int, classes: int, dtype=np.uint8, unlabeled: bool = True):
    """Blocky labels of `classes` classes, with an unlabeled band on top when asked."""
    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, (height // 8 + 1, width // 8 + 1)).astype(dtype)
    labels = np.repeat(np.repeat(labels, 8, axis=0), 8, axis=1)[:height, :width].copy()
    if unlabeled:
        labels[: height // 5] = unlabeled_value(labels)
    return labels


@pytest.mark.parametrize("dtype, classes", [(np.uint8, 7), (np.uint16, 300)])
@pytest.mark.parametrize("unlabeled", [True, False])
def test_counts_of_classes_equal_class_counts(dtype, classes, unlabeled):
    labels = blobs(61, 83, classes, dtype, unlabeled)
    per_class = np.bincount(labels.ravel(), minlength=classes)[:classes]
    np.testing.assert_array_equal(counts_of_classes(per_class, labels), class_counts(labels))


def test_counts_of_classes_reject_counts_that_do_not_fit():
    labels = blobs(10, 10, 3)
    with pytest.raises(ValueError, match="at most 255"):
        counts_of_classes(np.zeros(256, np.int64), labels)
    with pytest.raises(ValueError, match="do not fit"):
        counts_of_classes(np.array([60, 60]), labels)
    with pytest.raises(ValueError, match="do not fit"):
        counts_of_classes(np.array([-1, 5]), labels)


@pytest.mark.parametrize("dtype, classes", [(np.uint8, 7), (np.uint16, 300)])
@pytest.mark.parametrize("unlabeled", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_overlay_with_given_counts_is_the_same_image(dtype, classes, unlabeled, alpha):
    """The node passes the engine's counts; the picture must be the one overlay counts itself,
    legend included, with and without unlabeled pixels (which keep the image)."""
    labels = blobs(120, 160, classes, dtype, unlabeled)
    rgb = gradient_image(120, 160)
    colors = class_colors(classes)
    names = [f"class {i}" for i in range(classes)]
    per_class = np.bincount(labels.ravel(), minlength=classes)[:classes]
    given = overlay(rgb, labels, colors, alpha, names, counts=counts_of_classes(per_class, labels))
    np.testing.assert_array_equal(given, overlay(rgb, labels, colors, alpha, names))
    if unlabeled:  # row 0 is unlabeled and above the legend (its margin is at least 1 pixel)
        np.testing.assert_array_equal(given[0], rgb[0])


def test_overlay_rejects_counts_of_another_dtype():
    labels = blobs(20, 20, 3)
    with pytest.raises(ValueError, match="256 entries"):
        overlay(gradient_image(20, 20), labels, palette(3), counts=np.zeros(65536, np.int64))


def test_class_colors_are_cached_and_read_only():
    colors = class_colors(21)
    assert class_colors(21) is colors
    np.testing.assert_array_equal(colors, palette(22)[1:])
    with pytest.raises(ValueError):
        colors[0] = 0


def test_legend_repeats_identically_from_its_cached_layout():
    """Frames of a stream reuse the legend's layout; the drawing must not change."""
    labels = blobs(240, 320, 5, unlabeled=False)
    rgb = gradient_image(240, 320)
    names = ["a rather long class name that will not fit " * 3, "b", "c", "d", "e"]
    first = overlay(rgb, labels, palette(5), 0.5, names)
    again = overlay(rgb, labels, palette(5), 0.5, names)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, overlay(rgb, labels, palette(5), 0.5, None))
