import numpy as np
import pytest

from pipeline.core.metrics import (
    SegmentationScores,
    VolumeScores,
    confident_confusion_matrix,
    confusion_matrix,
    hd95,
    iou_scores,
)


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


# medpy 0.5.2's medpy.metric.binary values on the arrays below, recorded (medpy is not a dependency):
# hd95(b, a), hd95(b, a, voxelspacing=(1.5, 0.7)), hd95(w, v), hd95(w, v, voxelspacing=(10, 1.25, 1.25)),
# dc(w, v)
MEDPY_2D, MEDPY_2D_SPACED, MEDPY_3D, MEDPY_3D_SPACED, MEDPY_DC_3D = (
    5.757009410119031, 6.1856954593329805, 2.23606797749979, 10.307764064044152, 0.41543026706231456)


def _medpy_arrays():
    a = np.zeros((20, 24), bool)
    a[3:12, 4:15] = True
    a[14:17, 18:22] = True
    b = np.zeros((20, 24), bool)
    b[5:13, 6:16] = True
    v = np.zeros((5, 16, 16), bool)
    v[1:4, 3:10, 4:12] = True
    w = np.zeros((5, 16, 16), bool)
    w[0:3, 5:12, 3:11] = True
    w[4, 0, 0] = True
    return a, b, v, w


def test_hd95_is_medpys_in_2d_and_3d_with_and_without_spacing():
    a, b, v, w = _medpy_arrays()
    assert hd95(b, a) == pytest.approx(MEDPY_2D) and hd95(a, b) == pytest.approx(MEDPY_2D)
    assert hd95(b, a, (1.5, 0.7)) == pytest.approx(MEDPY_2D_SPACED)
    assert hd95(w, v) == pytest.approx(MEDPY_3D)
    assert hd95(w, v, (10.0, 1.25, 1.25)) == pytest.approx(MEDPY_3D_SPACED)


def test_volume_scores_stack_slices_in_order_and_follow_the_stated_rules():
    a, b, v, w = _medpy_arrays()
    gt, pred = v.astype(np.uint8), w.astype(np.uint8)  # class 1 = the 3-D blobs above
    gt[2, 0, 0] = 2  # class 2: only in this volume's ground truth (a missed structure)
    scores = VolumeScores(["bg", "one", "two", "three"], {"p1": (10.0, 1.25, 1.25)})
    for index in (3, 0, 4, 1, 2):  # out of order: result() stacks by the order key
        scores.add("p1", index, gt[index], pred[index])
    empty = np.zeros((16, 16), np.uint8)
    scores.add("p2", 0, empty, empty)  # no class at all: counts for nothing
    result = scores.result()
    assert result["volumes"] == 2 and result["hd95_unit"] == "mm"
    assert result["per_class_dice"]["one"] == pytest.approx(MEDPY_DC_3D, abs=1e-4)
    assert result["per_class_hd95"]["one"] == pytest.approx(MEDPY_3D_SPACED, abs=0.01)
    assert result["per_class_dice"]["two"] == 0.0 and result["per_class_hd95"]["two"] is None
    assert result["hd95_unmatched"] == {"one": 0, "two": 1, "three": 0}
    assert result["per_class_dice"]["three"] is None
    assert result["mean_dice"] == pytest.approx((MEDPY_DC_3D + 0.0) / 2, abs=1e-4)


def test_segmentation_scores_add_per_volume_scores_keyed_by_the_volume_of_each_id():
    calls = []

    def volume_of(image_id):
        calls.append(image_id)
        return image_id.split("_")[0], int(image_id.split("_")[1])

    scores = SegmentationScores(["bg", "fg"], volume_of)
    mask = np.zeros((4, 4), np.uint8)
    mask[1:3, 1:3] = 1
    for image_id in ("v1_1", "v1_0", "v2_0"):
        scores.add(mask, mask, image_id)
    result = scores.result()
    assert calls == ["v1_1", "v1_0", "v2_0"]
    assert result["per_volume"]["volumes"] == 2 and result["per_volume"]["mean_dice"] == 1.0
    assert result["per_volume"]["hd95_unit"] == "pixels"
    assert "per_volume" not in SegmentationScores(["bg", "fg"]).result()
