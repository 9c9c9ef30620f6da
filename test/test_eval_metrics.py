"""Confusion matrix and metrics against hand-computed examples (mmseg's conventions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ovseg_ros.evaluation.metrics import IGNORE_INDEX, ConfusionMatrix

# 3 classes; the last pixel is ignored. Pairs (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,0).
GT = np.array([[0, 0, 1], [1, 2, IGNORE_INDEX]])
PRED = np.array([[0, 1, 1], [1, 0, 2]])


def test_hand_computed_confusion_matrix_and_metrics():
    m = ConfusionMatrix(3)
    m.update(GT, PRED)
    assert m.counts[:, :3].tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m.true_positives.tolist() == [1, 2, 0]
    assert m.gt_pixels.tolist() == [2, 2, 1]
    assert m.pred_pixels.tolist() == [2, 3, 0]  # the ignored pixel's prediction (2) is not counted
    # IoU = TP / (TP + FP + FN): 1/(1+1+1), 2/(2+1+0), 0/(0+0+1)
    np.testing.assert_allclose(m.iou(), [1 / 3, 2 / 3, 0.0])
    np.testing.assert_allclose(m.accuracy(), [1 / 2, 1.0, 0.0])
    s = m.summary()
    assert s["mIoU"] == pytest.approx(1 / 3)
    assert s["mAcc"] == pytest.approx(1 / 2)
    assert s["aAcc"] == pytest.approx(3 / 5)


def test_class_absent_from_gt_and_prediction_is_nan_and_left_out_of_the_mean():
    m = ConfusionMatrix(4)
    m.update(GT, PRED)
    assert math.isnan(m.iou()[3]) and math.isnan(m.accuracy()[3])
    assert m.summary()["mIoU"] == pytest.approx(1 / 3)  # same as over the 3 present classes
    assert m.summary()["mAcc"] == pytest.approx(1 / 2)


def test_class_predicted_but_absent_from_gt_scores_zero_iou_and_nan_acc():
    m = ConfusionMatrix(3)
    m.update(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]))
    np.testing.assert_allclose(m.iou(), [0.5, 1.0, 0.0])
    assert math.isnan(m.accuracy()[2])
    assert m.summary()["mIoU"] == pytest.approx(0.5)  # (0.5 + 1 + 0) / 3
    assert m.summary()["mAcc"] == pytest.approx(0.75)  # (0.5 + 1) / 2


def test_no_class_prediction_is_a_miss_for_the_gt_class_only():
    m = ConfusionMatrix(2)
    m.update(np.array([0, 0, 1]), np.array([0, IGNORE_INDEX, 1]))
    np.testing.assert_allclose(m.iou(), [0.5, 1.0])  # class 0: TP 1, FN 1; class 1 untouched
    assert m.pred_pixels.tolist() == [1, 1]
    assert m.summary()["aAcc"] == pytest.approx(2 / 3)


def test_custom_ignore_index():
    m = ConfusionMatrix(2, ignore_index=7)
    m.update(np.array([0, 7, 1]), np.array([0, 1, 0]))
    assert m.counts.sum() == 2
    np.testing.assert_allclose(m.iou(), [0.5, 0.0])


def test_accumulating_images_equals_one_big_image_and_merge():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 5, (7, 9)) for _ in range(3)]
    preds = [rng.integers(0, 5, (7, 9)) for _ in range(3)]
    gts[1][0, :4] = IGNORE_INDEX
    one, many = ConfusionMatrix(5), ConfusionMatrix(5)
    one.update(np.concatenate(gts), np.concatenate(preds))
    for g, p in zip(gts, preds, strict=True):
        many.update(g, p)
    np.testing.assert_array_equal(one.counts, many.counts)
    half = ConfusionMatrix(5)
    half.update(gts[0], preds[0])
    rest = ConfusionMatrix(5)
    for g, p in zip(gts[1:], preds[1:], strict=True):
        rest.update(g, p)
    half.merge(rest)
    np.testing.assert_array_equal(half.counts, one.counts)


def test_iou_matches_a_per_class_brute_force():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 6, 500)
    gt[rng.random(500) < 0.1] = IGNORE_INDEX
    pred = rng.integers(0, 7, 500)  # 6 = no class
    pred[pred == 6] = IGNORE_INDEX
    m = ConfusionMatrix(6)
    m.update(gt, pred)
    keep = gt != IGNORE_INDEX
    for c in range(6):
        tp = np.sum(keep & (gt == c) & (pred == c))
        fp = np.sum(keep & (gt != c) & (pred == c))
        fn = np.sum(keep & (gt == c) & (pred != c))
        assert m.iou()[c] == pytest.approx(tp / (tp + fp + fn))
        assert m.accuracy()[c] == pytest.approx(tp / (tp + fn))


def test_empty_matrix_gives_nan():
    s = ConfusionMatrix(3).summary()
    assert all(math.isnan(v) for v in s.values())


@pytest.mark.parametrize(
    ("gt", "pred", "message"),
    [
        (np.zeros((2, 2), int), np.zeros((2, 3), int), "shape"),
        (np.array([0, 3]), np.array([0, 0]), "label values [3]"),
        (np.array([0, -1]), np.array([0, 0]), "label values [-1]"),
    ],
)
def test_bad_updates_raise_with_reason(gt, pred, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ConfusionMatrix(3).update(gt, pred)


def test_ignore_index_must_not_be_a_class():
    with pytest.raises(ValueError, match="is a class id"):
        ConfusionMatrix(3, ignore_index=2)
