"""mIoU, mAcc and aAcc from a confusion matrix accumulated over a whole split, the way mmsegmentation reports them.

Areas are summed over every image first and divided once at the end (not averaged per image). Pixels whose label is
the ignore index do not count at all, whatever was predicted there. A class that appears neither in the labels nor
in the predictions has IoU 0/0 = NaN and is left out of the mean; a class predicted but absent from the labels has
IoU 0 (it is only false positives) and accuracy NaN.
"""
import numpy as np

from ..errors import PVTDenseError

IGNORE_INDEX = 255


class ConfusionMatrix:
    """confusion[label, prediction] pixel counts over `num_classes` classes, ignoring `ignore_index` labels."""

    def __init__(self, num_classes, ignore_index=IGNORE_INDEX):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise PVTDenseError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, prediction, label):
        """Add one (H, W) prediction / label pair (or any equal-shaped integer arrays)."""
        prediction = np.asarray(prediction)
        label = np.asarray(label)
        if prediction.shape != label.shape:
            raise PVTDenseError(f"prediction shape {prediction.shape} differs from label shape {label.shape}")
        valid = label != self.ignore_index
        label = label[valid].astype(np.int64)
        prediction = prediction[valid].astype(np.int64)
        bad = (label < 0) | (label >= self.num_classes)
        if bad.any():
            values = sorted(set(label[bad].tolist()))[:5]
            raise PVTDenseError(f"label values {values} are outside 0..{self.num_classes - 1} and are not the "
                                f"ignore index {self.ignore_index}")
        bad = (prediction < 0) | (prediction >= self.num_classes)
        if bad.any():
            raise PVTDenseError(f"predicted classes {sorted(set(prediction[bad].tolist()))[:5]} are outside "
                                f"0..{self.num_classes - 1}")
        self.matrix += np.bincount(label * self.num_classes + prediction,
                                   minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)
        return self

    def merge(self, other):
        self.matrix += other.matrix
        return self

    def summary(self):
        return metrics_from_confusion(self.matrix)


def metrics_from_confusion(matrix):
    """{"aAcc", "mIoU", "mAcc"} (fractions; NaN where nothing was labelled) and per-class "IoU", "Acc" arrays."""
    matrix = np.asarray(matrix, dtype=np.float64)
    intersection = np.diag(matrix)
    label_area = matrix.sum(axis=1)
    prediction_area = matrix.sum(axis=0)
    union = label_area + prediction_area - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union
        accuracy = intersection / label_area
        overall = intersection.sum() / label_area.sum() if label_area.sum() > 0 else float("nan")
    return {
        "aAcc": float(overall),
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(accuracy),
        "IoU": iou,
        "Acc": accuracy,
        "label_pixels": label_area.astype(np.int64),
    }


def _nanmean(values):
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def segmentation_metrics(predictions, labels, num_classes, ignore_index=IGNORE_INDEX):
    """Metrics of a list of prediction/label pairs (see `metrics_from_confusion`)."""
    confusion = ConfusionMatrix(num_classes, ignore_index)
    for prediction, label in zip(predictions, labels):
        confusion.update(prediction, label)
    return confusion.summary()
