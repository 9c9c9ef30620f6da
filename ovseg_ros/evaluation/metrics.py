"""Confusion matrix and the mmseg-style segmentation metrics: per-class IoU and Acc, mIoU, aAcc."""

from __future__ import annotations

import numpy as np

#: Ground-truth value of pixels that are not evaluated (VOC boundaries, ADE "other", ...).
IGNORE_INDEX = 255


class ConfusionMatrix:
    """Pixel counts per (ground-truth class, predicted class), accumulated over images.

    Predictions outside [0, C) (the engine's unlabeled value, 255) mean "no class": they count as a
    miss for the ground-truth class (a false negative) and as a false positive for none.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        """An empty matrix over classes 0..num_classes-1; gt pixels equal to ignore_index skip."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class id (0..{num_classes - 1})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # The extra last column holds the pixels predicted as no class.
        self.counts = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image: gt and pred are HxW integer maps of the same shape."""
        gt = np.asarray(gt)
        pred = np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from label shape {gt.shape}")
        c = self.num_classes
        keep = gt != self.ignore_index
        g = gt[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        bad = (g < 0) | (g >= c)
        if bad.any():
            values = sorted({int(v) for v in np.unique(g[bad])})[:10]
            raise ValueError(
                f"label values {values} are neither a class id (0..{c - 1}) nor the ignore "
                f"value {self.ignore_index}"
            )
        p = np.where((p >= 0) & (p < c), p, c)
        self.counts += np.bincount(g * (c + 1) + p, minlength=c * (c + 1)).reshape(c, c + 1)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix over the same classes (e.g. from another worker)."""
        if other.counts.shape != self.counts.shape:
            raise ValueError("cannot merge confusion matrices over different class counts")
        self.counts += other.counts

    @property
    def true_positives(self) -> np.ndarray:
        """(C,) pixels of each class predicted as that class."""
        return np.diagonal(self.counts[:, : self.num_classes]).copy()

    @property
    def gt_pixels(self) -> np.ndarray:
        """(C,) evaluated ground-truth pixels of each class."""
        return self.counts.sum(axis=1)

    @property
    def pred_pixels(self) -> np.ndarray:
        """(C,) evaluated pixels predicted as each class."""
        return self.counts[:, : self.num_classes].sum(axis=0)

    def iou(self) -> np.ndarray:
        """(C,) TP / (TP + FP + FN); NaN for a class in neither ground truth nor prediction."""
        tp = self.true_positives
        union = self.gt_pixels + self.pred_pixels - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def accuracy(self) -> np.ndarray:
        """(C,) per-class pixel accuracy (recall) TP / gt; NaN for a class with no gt pixels."""
        tp = self.true_positives
        gt = self.gt_pixels
        return np.where(gt > 0, tp / np.maximum(gt, 1), np.nan)

    def summary(self) -> dict[str, float]:
        """mIoU and mAcc (means over the non-NaN classes, as mmseg) and aAcc, as fractions."""
        iou, acc = self.iou(), self.accuracy()
        total = int(self.counts.sum())
        return {
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "aAcc": float(self.true_positives.sum() / total) if total else float("nan"),
        }


def _nanmean(values: np.ndarray) -> float:
    """Mean over the finite entries, NaN when there are none (without numpy's warning)."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
