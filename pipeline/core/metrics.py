"""Confusion matrices, IoU, Dice and HD95: the single scoring code of every stage."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.data.dataset import IGNORE


def not_scored(reason: str) -> dict:
    """The scores of a stage none of whose scored ids has ground truth: its outputs are still
    written; the run's table and metrics.json say why there is no number."""
    return {"miou": None, "scored_images": 0, "not_scored": reason}


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
        "per_class_iou": _per_class(class_names, iou),
        "pixel_accuracy": float(true_positive.sum() / max(confusion.sum(), 1)),
    }


def dice_scores(confusion: np.ndarray, class_names: list[str]) -> dict:
    """Dice 2TP / (2TP + FP + FN) per class over all pixels pooled (None if absent from the
    ground truth), and its mean over the foreground classes present (the medical convention)."""
    true_positive = np.diag(confusion).astype(np.float64)
    gt_total, pred_total = confusion.sum(axis=1), confusion.sum(axis=0)
    present = gt_total > 0
    dice = np.where(present, 2 * true_positive / np.maximum(gt_total + pred_total, 1), np.nan)
    foreground = dice[1:][present[1:]]
    return {
        "mean_dice": float(foreground.mean()) if foreground.size else 0.0,
        "per_class_dice": _per_class(class_names, dice),
    }


def _per_class(class_names: list[str], values: np.ndarray) -> dict:
    """Each class's value to 4 decimals, None where it is NaN (the class is absent)."""
    return {name: (None if np.isnan(v) else round(float(v), 4)) for name, v in zip(class_names, values)}


def hd95(a: np.ndarray, b: np.ndarray, spacing=None) -> float:
    """95th-percentile Hausdorff distance between the borders of two non-empty boolean masks of
    any dimension, as medpy's ``hd95``: the surface distances of both directions pooled, then
    their 95th percentile (not the larger of two directed percentiles). A border pixel is a
    mask pixel with a face neighbour outside it (the image edge counts as outside); distances
    are in pixels, or in the units of ``spacing`` (one value per axis)."""
    border_a = a & ~ndimage.binary_erosion(a)
    border_b = b & ~ndimage.binary_erosion(b)
    to_b = ndimage.distance_transform_edt(~border_b, sampling=spacing)[border_a]
    to_a = ndimage.distance_transform_edt(~border_a, sampling=spacing)[border_b]
    return float(np.percentile(np.concatenate([to_b, to_a]), 95))


class SegmentationScores:
    """Scores of a set of predictions: IoU and Dice from the pooled confusion matrix, and per
    class the mean over 2-D images (slices) of HD95 where both the ground truth and the
    prediction contain the class (images where only one does are counted under
    ``hd95_unmatched``, not averaged: their distance is undefined). Pixels the ground truth
    leaves unlabelled are not scored."""

    def __init__(self, class_names: list[str], volume_of=None, spacing: dict | None = None):
        """``volume_of(image_id) -> (volume, slice order)`` adds the per-volume scores of
        :class:`VolumeScores` under ``per_volume``, with ``spacing`` per volume."""
        self.class_names = class_names
        self.confusion = np.zeros((len(class_names), len(class_names)), np.int64)
        self.distances = {name: [] for name in class_names[1:]}
        self.unmatched = {name: 0 for name in class_names[1:]}
        self.images = 0
        self.volume_of = volume_of
        self.volumes = VolumeScores(class_names, spacing) if volume_of is not None else None

    def add(self, gt: np.ndarray, pred: np.ndarray, image_id: str | None = None) -> None:
        self.images += 1
        place = self.volume_of(image_id) if self.volumes is not None else None
        if place is not None:
            self.volumes.add(*place, gt, pred)
        elif self.volumes is not None:
            self.volumes.incomplete.add(image_id)
        self.confusion += confusion_matrix(gt, pred, len(self.class_names))
        labelled = gt != IGNORE
        for index, name in enumerate(self.class_names[1:], start=1):
            in_gt, in_pred = gt == index, (pred == index) & labelled
            if in_gt.any() and in_pred.any():
                self.distances[name].append(hd95(in_gt, in_pred))
            elif in_gt.any() or in_pred.any():
                self.unmatched[name] += 1

    def result(self) -> dict:
        per_class = {name: (round(float(np.mean(d)), 2) if d else None) for name, d in self.distances.items()}
        measured = [v for v in per_class.values() if v is not None]
        overlap = iou_scores(self.confusion, self.class_names) | dice_scores(self.confusion, self.class_names)
        return overlap | {
            "mean_hd95": float(np.mean(measured)) if measured else None,
            "per_class_hd95": per_class,
            "hd95_unmatched": self.unmatched,
            "scored_images": self.images,
        } | ({"per_volume": self.volumes.result()} if self.volumes is not None else {})


class VolumeScores:
    """Dice and HD95 per 3-D volume, then their mean over volumes: how the medical literature
    (and medpy's ``dc``/``hd95``) scores stacks of 2-D slices such as ACDC's.

    ``add(volume, order, gt, pred)`` collects one slice; ``result`` stacks each volume's
    slices by ``order``. Only volumes every slice of which has ground truth are scored
    (data.Volumes.complete); the slices of the others are counted in
    ``slices_of_incomplete_volumes``. Per class and volume, over the pixels the ground truth labels:

    * both masks contain the class: Dice 2|A∩B| / (|A|+|B|), and HD95 (:func:`hd95`, in the
      units of the volume's spacing, else pixels with one slice step counting as one pixel);
    * only one of them does (a missed structure or a hallucinated one): Dice 0, and the
      volume is counted in ``hd95_unmatched`` (HD95 is undefined; it is not averaged);
    * neither does: the volume does not count for that class.

    Per class: the mean over the volumes that count; ``mean_dice``/``mean_hd95``: the mean of
    the per-class values over the foreground classes that have one."""

    def __init__(self, class_names: list[str], spacing: dict | None = None):
        self.class_names = class_names
        self.spacing = spacing or {}  # volume -> (slice, row, column) spacing
        self.slices: dict[str, list] = {}
        self.incomplete: set[str] = set()  # slices of volumes not every slice of which has a mask

    def add(self, volume: str, order, gt: np.ndarray, pred: np.ndarray) -> None:
        self.slices.setdefault(volume, []).append((order, gt, pred))

    def result(self) -> dict:
        dice = {name: [] for name in self.class_names[1:]}
        distances = {name: [] for name in self.class_names[1:]}
        unmatched = {name: 0 for name in self.class_names[1:]}
        for volume, slices in self.slices.items():
            slices = sorted(slices, key=lambda item: item[0])
            gt = np.stack([s[1] for s in slices])
            pred = np.stack([s[2] for s in slices])
            labelled = gt != IGNORE
            for index, name in enumerate(self.class_names[1:], start=1):
                in_gt, in_pred = gt == index, (pred == index) & labelled
                if in_gt.any() and in_pred.any():
                    dice[name].append(2 * np.count_nonzero(in_gt & in_pred) / (in_gt.sum() + in_pred.sum()))
                    distances[name].append(hd95(in_gt, in_pred, self.spacing.get(volume)))
                elif in_gt.any() or in_pred.any():
                    dice[name].append(0.0)
                    unmatched[name] += 1
        per_class_dice = {name: (round(float(np.mean(v)), 4) if v else None) for name, v in dice.items()}
        per_class_hd95 = {name: (round(float(np.mean(v)), 2) if v else None) for name, v in distances.items()}
        return {
            "volumes": len(self.slices),
            "slices_of_incomplete_volumes": len(self.incomplete),
            "mean_dice": _mean_of_present(per_class_dice),
            "per_class_dice": per_class_dice,
            "mean_hd95": _mean_of_present(per_class_hd95),
            "per_class_hd95": per_class_hd95,
            "hd95_unmatched": unmatched,
            "hd95_unit": "mm" if self.spacing else "pixels",
        }


def _mean_of_present(values: dict):
    present = [v for v in values.values() if v is not None]
    return float(np.mean(present)) if present else None
