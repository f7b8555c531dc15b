import numpy as np
import pytest

from pipeline.metrics import confident_confusion_matrix, confusion_matrix, iou_scores


def test_confusion_matrix_matches_hand_count_and_ignores_255():
    gt = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [1, 1, 2]], dtype=np.uint8)
    cm = confusion_matrix(gt, pred, 3)
    expected = np.array([[1, 1, 0],
                         [0, 2, 0],
                         [0, 1, 0]])
    np.testing.assert_array_equal(cm, expected)


def test_iou_is_mean_over_classes_present_in_ground_truth():
    cm = np.array([[1, 1, 0, 0],
                   [0, 2, 0, 0],
                   [0, 1, 0, 0],
                   [0, 0, 0, 0]])  # class 3 absent from GT
    scores = iou_scores(cm, ["bg", "a", "b", "c"])
    # bg: 1/(2+1-1)=0.5; a: 2/(2+4-2)=0.5; b: 0/(1+0)=0
    assert scores["per_class_iou"] == {"bg": 0.5, "a": 0.5, "b": 0.0, "c": None}
    assert scores["miou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)


def test_class_predicted_but_absent_from_ground_truth_does_not_enter_the_mean():
    cm = np.array([[2, 2], [0, 0]])
    scores = iou_scores(cm, ["bg", "a"])
    assert scores["miou"] == pytest.approx(0.5)
    assert scores["per_class_iou"]["a"] is None


def test_unsure_prediction_must_not_be_scored_as_a_class():
    gt = np.zeros((2, 2), dtype=np.uint8)
    pred = np.full((2, 2), 255, dtype=np.uint8)
    with pytest.raises(ValueError):
        confusion_matrix(gt, pred, 3)
    assert confident_confusion_matrix(gt, pred, 3).sum() == 0


def test_confident_confusion_counts_only_sure_pixels():
    gt = np.array([[1, 1, 0]], dtype=np.uint8)
    pred = np.array([[1, 255, 0]], dtype=np.uint8)
    cm = confident_confusion_matrix(gt, pred, 2)
    np.testing.assert_array_equal(cm, [[1, 0], [0, 1]])
