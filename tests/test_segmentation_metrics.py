"""mIoU / mAcc / aAcc against hand-computed values and a brute-force per-class reference."""
import math

import numpy as np
import pytest

from pvt_dense.errors import PVTDenseError
from pvt_dense.segmentation.evaluation import format_results
from pvt_dense.segmentation.metrics import ConfusionMatrix, segmentation_metrics

NAN = float("nan")


def assert_same(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert (math.isnan(a) and math.isnan(e)) or a == pytest.approx(e), (actual, expected)


def test_hand_computed_with_ignored_pixels_and_a_class_absent_from_both():
    prediction = np.array([[0, 1, 1], [2, 2, 0]])
    label = np.array([[0, 1, 255], [2, 1, 0]])  # the ignored pixel's prediction (1) must not count anywhere
    result = segmentation_metrics([prediction], [label], num_classes=4)
    # class 0: 2/2; class 1: label 2, pred 1, both 1 -> IoU 1/2, Acc 1/2; class 2: label 1, pred 2 -> IoU 1/2,
    # Acc 1; class 3 is in neither -> NaN, left out of the means.
    assert_same(result["IoU"], [1.0, 0.5, 0.5, NAN])
    assert_same(result["Acc"], [1.0, 0.5, 1.0, NAN])
    assert result["mIoU"] == pytest.approx(2 / 3)
    assert result["mAcc"] == pytest.approx(5 / 6)
    assert result["aAcc"] == pytest.approx(4 / 5)


def test_predicted_but_unlabelled_class_counts_as_zero_iou_and_areas_sum_over_images():
    first = (np.array([[0, 1, 1], [2, 2, 0]]), np.array([[0, 1, 255], [2, 1, 0]]))
    second = (np.array([[3, 0]]), np.array([[0, 0]]))
    alone = segmentation_metrics([second[0]], [second[1]], num_classes=4)
    assert_same(alone["IoU"], [0.5, NAN, NAN, 0.0])
    assert_same(alone["Acc"], [0.5, NAN, NAN, NAN])
    assert (alone["mIoU"], alone["mAcc"], alone["aAcc"]) == pytest.approx((0.25, 0.5, 0.5))
    # Over both images the areas add up before dividing (not a mean of per-image scores).
    both = segmentation_metrics([first[0], second[0]], [first[1], second[1]], num_classes=4)
    assert_same(both["IoU"], [0.75, 0.5, 0.5, 0.0])
    assert both["mIoU"] == pytest.approx(0.4375)
    assert both["mAcc"] == pytest.approx(0.75)
    assert both["aAcc"] == pytest.approx(5 / 7)


def brute_force(predictions, labels, num_classes, ignore=255):
    ious, accs, correct, total = [], [], 0, 0
    for cls in range(num_classes):
        inter = union = labelled = 0
        for p, l in zip(predictions, labels, strict=True):
            for pv, lv in zip(p.ravel().tolist(), l.ravel().tolist(), strict=True):
                if lv == ignore:
                    continue
                inter += pv == cls and lv == cls
                union += pv == cls or lv == cls
                labelled += lv == cls
        ious.append(inter / union if union else NAN)
        accs.append(inter / labelled if labelled else NAN)
    for p, l in zip(predictions, labels, strict=True):
        valid = l != ignore
        correct += int((p[valid] == l[valid]).sum())
        total += int(valid.sum())
    return ious, accs, correct / total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_brute_force_reference_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    predictions = [rng.integers(0, 5, (7, 9)) for _ in range(3)]
    labels = [np.where(rng.random((7, 9)) < 0.2, 255, rng.integers(0, 4, (7, 9))) for _ in range(3)]
    result = segmentation_metrics(predictions, labels, num_classes=6)
    ious, accs, overall = brute_force(predictions, labels, 6)
    assert_same(result["IoU"], ious)
    assert_same(result["Acc"], accs)
    assert result["aAcc"] == pytest.approx(overall)
    assert result["mIoU"] == pytest.approx(np.nanmean(ious))


def test_bad_shapes_and_values_are_errors():
    with pytest.raises(PVTDenseError, match="shape"):
        ConfusionMatrix(3).update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(PVTDenseError, match="outside"):
        ConfusionMatrix(3).update(np.zeros((2, 2)), np.full((2, 2), 7))
    with pytest.raises(PVTDenseError, match="num_classes"):
        ConfusionMatrix(0)


def test_table_prints_every_class_and_nan_for_absent_ones():
    result = segmentation_metrics([np.array([[0, 1]])], [np.array([[0, 1]])], num_classes=3)
    result.update(samples=1, skipped=0, out_of_range_pixels=0)
    table = format_results(result, ["wall", "sky", "tree"])
    assert "wall" in table and "100.00" in table
    assert "tree" in table and "nan" in table.splitlines()[4]
    assert "mIoU 100.00" in table
