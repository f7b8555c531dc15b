"""Confusion matrices and IoU, the single scoring code of every stage."""
from __future__ import annotations

import numpy as np

from pipeline.data import IGNORE


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[g, p] over pixels whose ground truth is not 'ignore' (255)."""
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    valid = gt != IGNORE
    gt, pred = gt[valid].astype(np.int64), pred[valid].astype(np.int64)
    # A prediction of 255 ('unsure') left in by the caller would be scored as a class: refuse it.
    if pred.size and (pred.max() >= num_classes or gt.max() >= num_classes):
        raise ValueError("class index out of range in confusion_matrix")
    return np.bincount(gt * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def confident_confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion over the pixels a pseudo mask is sure about (pred != 255)."""
    sure = pred != IGNORE
    return confusion_matrix(gt[sure], pred[sure], num_classes)


def iou_scores(confusion: np.ndarray, class_names: list[str]) -> dict:
    """mIoU over the classes present in the ground truth, plus per-class IoU (None if absent)."""
    true_positive = np.diag(confusion).astype(np.float64)
    gt_total = confusion.sum(axis=1)
    union = gt_total + confusion.sum(axis=0) - true_positive
    present = gt_total > 0
    iou = np.where(present, true_positive / np.maximum(union, 1), np.nan)
    return {
        "miou": float(np.nanmean(iou)) if present.any() else 0.0,
        "per_class_iou": {name: (None if np.isnan(v) else round(float(v), 4)) for name, v in zip(class_names, iou)},
        "pixel_accuracy": float(true_positive.sum() / max(confusion.sum(), 1)),
    }
