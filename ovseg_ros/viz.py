"""Colour palette, label colouring, overlays and legends shared by the CLI and the ROS node.

Everything here works in RGB channel order on uint8 images. Label maps are HxW integer arrays in
which the largest value of the dtype marks unlabeled pixels (255 for uint8, 65535 for uint16).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

_FONT = cv2.FONT_HERSHEY_SIMPLEX
# Opacity of the dark box behind the legend: enough for white text on a white image.
_LEGEND_BOX_OPACITY = 0.65
_TEXT_COLOR = (255, 255, 255)
_SWATCH_BORDER_COLOR = (200, 200, 200)


def palette(n: int) -> np.ndarray:
    """Return ``n`` distinct RGB colours (n x 3 uint8): the PASCAL VOC colour map, extended."""
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    if n > 1 << 24:
        raise ValueError(f"palette size must be <= {1 << 24} (24-bit colours), got {n}")
    ids = np.arange(n, dtype=np.int64)
    colors = np.zeros((n, 3), dtype=np.int64)
    # VOC bit interleaving: bit 3k+c of the class id goes to bit (7 - k) of channel c.
    for k in range(8):
        for c in range(3):
            colors[:, c] |= ((ids >> (3 * k + c)) & 1) << (7 - k)
    return colors.astype(np.uint8)


@functools.lru_cache(maxsize=16)
def class_colors(n: int) -> np.ndarray:
    """Colours of vocabulary classes 0..n-1: the palette without its first (black) entry.

    Read-only and cached: the node asks for the same vocabulary's colours every frame, and
    building them took 0.16 ms a call (21 classes, our build machine).
    """
    colors = palette(n + 1)[1:]
    colors.flags.writeable = False
    return colors


def unlabeled_value(labels: np.ndarray) -> int:
    """Return the label value that marks unlabeled pixels for this label map's dtype."""
    dtype = np.asarray(labels).dtype
    if dtype == np.uint8:
        return 255
    if dtype == np.uint16:
        return 65535
    raise TypeError(
        f"label maps must be uint8 (255 = unlabeled) or uint16 (65535 = unlabeled), got {dtype}"
    )


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be HxW, got shape {labels.shape}")
    unlabeled_value(labels)  # validates the dtype
    return labels


def class_counts(labels: np.ndarray) -> np.ndarray:
    """Pixels of each label value: 256 counts for uint8 maps, 65536 for uint16 (int64)."""
    labels = _check_labels(labels)
    if labels.dtype == np.uint8 and labels.size < 1 << 24:
        # OpenCV's histogram is about 3x faster than np.bincount; its float32 counts are exact
        # below 2**24 pixels.
        hist = cv2.calcHist([np.ascontiguousarray(labels)], [0], None, [256], [0, 256])
        return hist.ravel().astype(np.int64)
    bins = 256 if labels.dtype == np.uint8 else 65536
    return np.bincount(labels.ravel(), minlength=bins)


def counts_of_classes(class_pixels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """class_counts(labels) from the pixels of each class alone (e.g. the engine's Result.counts,
    reduced where the label map was made): the unlabeled value gets the pixels left over.

    Saves the pass over the pixels when the caller already knows the counts; they must be the
    label map's (a count past the classes' range or a total above its size raises).
    """
    labels = _check_labels(labels)
    ignore = unlabeled_value(labels)
    class_pixels = np.asarray(class_pixels)
    if class_pixels.ndim != 1 or len(class_pixels) > ignore:
        raise ValueError(
            f"expected at most {ignore} class counts for a {labels.dtype} label map, "
            f"got shape {class_pixels.shape}"
        )
    counts = np.zeros(ignore + 1, np.int64)
    counts[: len(class_pixels)] = class_pixels
    rest = labels.size - int(counts.sum())
    if rest < 0 or (counts < 0).any():
        raise ValueError(f"class counts do not fit a label map of {labels.size} pixels")
    counts[ignore] = rest
    return counts


def _check_class_ids(labels: np.ndarray, num_colors: int, counts: np.ndarray | None = None) -> None:
    """Raise if a labelled pixel has a class id without a colour (`counts`: class_counts)."""
    ignore = unlabeled_value(labels)
    counts = class_counts(labels) if counts is None else counts
    used = np.flatnonzero(counts[:ignore])
    highest = int(used[-1]) if used.size else -1
    if highest >= num_colors:
        raise ValueError(
            f"label map contains class {highest} but only {num_colors} colours were given; "
            f"pass palette(n) with n > {highest}"
        )


def colorize(
    labels: np.ndarray,
    colors: np.ndarray,
    unlabeled_color: Sequence[int] = (0, 0, 0),
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """Map an HxW label map to an HxWx3 uint8 RGB image using ``colors[label]``.

    ``counts`` (class_counts of the same labels) saves the pass that checks the class ids.
    """
    labels = _check_labels(labels)
    colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    _check_class_ids(labels, len(colors), counts)
    unlabeled_row = np.asarray(unlabeled_color, dtype=np.uint8).reshape(1, 3)
    if labels.dtype == np.uint8:
        # A 256-entry colour table applied by OpenCV's applyColorMap (a user colour map since
        # OpenCV 4.1): at 1280x720 about 7x faster than merging three channels for cv2.LUT and
        # 15x faster than a numpy gather.
        table = np.zeros((256, 3), np.uint8)
        table[: min(len(colors), 255)] = colors[:255]
        table[255] = unlabeled_row
        labels = np.ascontiguousarray(labels)  # OpenCV takes no negative or gapped strides
        return cv2.applyColorMap(labels, table.reshape(256, 1, 3))
    # One extra row at the end holds the unlabeled colour so a single gather does everything.
    table = np.vstack([colors, unlabeled_row])
    index = np.where(labels != unlabeled_value(labels), labels, len(colors))
    return table[index]


def legend_entries(
    labels: np.ndarray, names: Sequence[str], counts: np.ndarray | None = None
) -> list[tuple[int, str, float]]:
    """List (class id, name, pixel fraction) of classes present in ``labels``, largest first.

    ``counts`` (class_counts of the same labels) saves the pass over the pixels.
    """
    labels = _check_labels(labels)
    if labels.size == 0:
        return []
    counts = class_counts(labels) if counts is None else counts
    counts = counts[: unlabeled_value(labels)]
    present = np.flatnonzero(counts)
    total = float(labels.size)
    entries = [
        (int(i), names[i] if i < len(names) else f"class {i}", counts[i] / total) for i in present
    ]
    # Largest area first; ties keep the class order so the legend is stable between frames.
    entries.sort(key=lambda e: (-e[2], e[0]))
    return [(i, name, float(frac)) for i, name, frac in entries]


@dataclass(frozen=True)
class _LegendLayout:
    scale: float
    thickness: int
    pad: int
    swatch: int
    row_h: int
    baseline: int
    texts: tuple[str, ...]
    width: int
    height: int


def _text_size(text: str, scale: float, thickness: int) -> tuple[int, int, int]:
    (w, h), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    return w, h, baseline


def _fit_text(text: str, max_w: int, scale: float, thickness: int) -> str | None:
    """Shorten ``text`` with '...' until it is at most ``max_w`` pixels wide; None if impossible."""
    if _text_size(text, scale, thickness)[0] <= max_w:
        return text
    for end in range(len(text) - 1, 0, -1):
        candidate = text[:end].rstrip() + "..."
        if _text_size(candidate, scale, thickness)[0] <= max_w:
            return candidate
    return None


def _legend_layout(
    height: int, width: int, texts: Sequence[str], margin: int
) -> _LegendLayout | None:
    """Size the legend for an image; drop rows or shorten names to fit, None if nothing fits."""
    return _cached_layout(height, width, tuple(texts), margin)


# Frames of a stream mostly repeat the image size and the classes in view, and sizing the text
# takes tens of getTextSize calls; the layout is immutable, so a small cache serves them.
@functools.lru_cache(maxsize=64)
def _cached_layout(
    height: int, width: int, texts: tuple[str, ...], margin: int
) -> _LegendLayout | None:
    # Font grows with the image: about 0.5 at 480 px, 1.0 at 1000 px on the short side.
    scale = float(np.clip(min(height, width) / 1000.0, 0.35, 2.0))
    thickness = 1 if scale < 0.8 else 2
    _, text_h, baseline = _text_size("Ag", scale, thickness)
    pad = max(2, round(text_h * 0.4))
    swatch = text_h + baseline
    row_h = swatch + pad
    avail_w = width - 2 * margin
    avail_h = height - 2 * margin
    rows = min(len(texts), (avail_h - pad) // row_h) if avail_h > pad else 0
    if rows <= 0:
        return None
    max_text_w = avail_w - (3 * pad + swatch)
    if max_text_w <= 0:
        return None
    fitted = []
    for text in texts[:rows]:
        short = _fit_text(text, max_text_w, scale, thickness)
        if short is None:
            return None
        fitted.append(short)
    text_w = max(_text_size(t, scale, thickness)[0] for t in fitted)
    return _LegendLayout(
        scale=scale,
        thickness=thickness,
        pad=pad,
        swatch=swatch,
        row_h=row_h,
        baseline=baseline,
        texts=tuple(fitted),
        width=3 * pad + swatch + text_w,
        height=pad + rows * row_h,
    )


def _draw_legend(
    image: np.ndarray, entries: Sequence[tuple[int, str, float]], colors: np.ndarray
) -> None:
    """Draw the legend in place in the top-left corner of ``image``."""
    height, width = image.shape[:2]
    margin = max(1, round(min(height, width) * 0.01))
    layout = _legend_layout(height, width, [name for _, name, _ in entries], margin)
    if layout is None:
        return
    x0, y0 = margin, margin
    x1, y1 = x0 + layout.width, y0 + layout.height
    box = image[y0:y1, x0:x1]
    # Darken in place: scale, round, saturate (the same bytes as numpy's float32 rint).
    cv2.convertScaleAbs(box, dst=box, alpha=1.0 - _LEGEND_BOX_OPACITY)
    for row, text in enumerate(layout.texts):
        class_id = entries[row][0]
        top = y0 + layout.pad + row * layout.row_h
        sx0, sy0 = x0 + layout.pad, top
        sx1, sy1 = sx0 + layout.swatch - 1, top + layout.swatch - 1
        color = tuple(int(v) for v in colors[class_id])
        cv2.rectangle(image, (sx0, sy0), (sx1, sy1), color, thickness=cv2.FILLED)
        # A light border keeps dark class colours (VOC class 0 is black) visible on the dark box.
        cv2.rectangle(image, (sx0, sy0), (sx1, sy1), _SWATCH_BORDER_COLOR, thickness=1)
        origin = (sx1 + 1 + layout.pad, top + layout.swatch - layout.baseline)
        cv2.putText(
            image, text, origin, _FONT, layout.scale, _TEXT_COLOR, layout.thickness, cv2.LINE_AA
        )


def overlay(
    rgb: np.ndarray,
    labels: np.ndarray,
    colors: np.ndarray,
    alpha: float = 0.5,
    names: Sequence[str] | None = None,
    legend: bool = True,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """Blend class colours over an RGB image and, when ``names`` are given, draw a legend.

    ``counts`` (class_counts of the same labels, e.g. counts_of_classes(result.counts, labels))
    saves the pass that counts the pixels of each class.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {rgb.shape} {rgb.dtype}")
    labels = _check_labels(labels)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(
            f"label map shape {labels.shape} does not match image shape {rgb.shape[:2]}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    rgb = np.ascontiguousarray(rgb)  # e.g. a BGR->RGB view with negative strides
    ignore = unlabeled_value(labels)
    if counts is None:
        counts = class_counts(labels)  # one pass, for the class-id check and the legend
    elif len(counts) != ignore + 1:
        raise ValueError(f"counts must have {ignore + 1} entries (class_counts), got {len(counts)}")
    if alpha > 0.0:
        color_image = colorize(labels, colors, counts=counts)
        out = cv2.addWeighted(rgb, 1.0 - alpha, color_image, alpha, 0.0)
        if counts[ignore]:  # unlabeled pixels keep the image as it is
            out = cv2.copyTo(rgb, (labels == ignore).view(np.uint8), out)
    else:
        out = rgb.copy()
        _check_class_ids(labels, len(colors), counts)
    if legend and names is not None:
        entries = legend_entries(labels, names, counts)
        if entries:
            _draw_legend(out, entries, colors)
    return out


def confidence_u8(confidence: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] (float) -> 0-255 uint8, rounded and saturated (mono8 output)."""
    confidence = np.asarray(confidence)
    if confidence.dtype != np.float32:
        confidence = confidence.astype(np.float32)
    # convertScaleAbs rounds and saturates in one pass; probabilities are never negative.
    return cv2.convertScaleAbs(confidence, alpha=255.0)


def class_mask(labels: np.ndarray, class_id: int) -> np.ndarray:
    """0/255 uint8 mask of the pixels labelled class_id."""
    labels = _check_labels(labels)
    if labels.dtype == np.uint8:
        if not 0 <= class_id <= 255:
            return np.zeros(labels.shape, np.uint8)
        return cv2.compare(labels, class_id, cv2.CMP_EQ)
    return (labels == class_id).astype(np.uint8) * np.uint8(255)
