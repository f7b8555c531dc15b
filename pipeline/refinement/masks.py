"""CRF pseudo masks and their scores, shared by every refine method.

As in IRNet, each image's CAMs are labelled twice, once against a high background score
(``refine.fg_threshold``: what survives is confidently foreground) and once against a low
one (``refine.bg_threshold``: what is still background is confidently background); a dense
CRF snaps both label maps to image edges. Pixels that neither confirms are unsure (255).
The learned walks train their networks on such masks and end with the same two-map rule.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from pipeline.core.config import Config, DataConfig, RefineConfig
from pipeline.core.io import load_mask, save_mask
from pipeline.core.metrics import confident_confusion_matrix, confusion_matrix, iou_scores, not_scored
from pipeline.core.runtime import is_main_process, parallel_map, sum_across_ranks
from pipeline.data.dataset import IGNORE, open_dataset, score_ids
from pipeline.methods.cams import MAX_CAM_BINS, cam_argmax, cam_thresholds, load_cams, max_cam_histogram
from pipeline.methods.crf import crf_refine_labels

MaskMaker = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (image, cams, classes) -> mask


def pseudo_mask(image: np.ndarray, cams: np.ndarray, classes: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    """uint8 mask: 0 confident background, class index where confidently foreground, 255 unsure."""
    if len(classes) == 0:
        # The image label says there is no object: every pixel is background.
        return np.zeros(image.shape[:2], dtype=np.uint8)
    num_labels = len(classes) + 1
    confident_fg = crf_refine_labels(image, cam_argmax(cams, cfg.fg_threshold), num_labels, cfg.crf)
    confident_bg = crf_refine_labels(image, cam_argmax(cams, cfg.bg_threshold), num_labels, cfg.crf)
    return combine_confident(confident_fg, confident_bg, classes)


def combine_confident(confident_fg: np.ndarray, confident_bg: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The pseudo mask from two label maps (0 background, k for the k-th class of ``classes``),
    one made against a strong background and one against a weak one: a class where the
    first says so, background where both say so, unsure (255) elsewhere."""
    keys = np.concatenate([[0], classes]).astype(np.uint8)
    mask = keys[confident_fg]
    mask[confident_fg == 0] = IGNORE
    mask[(confident_fg == 0) & (confident_bg == 0)] = 0
    return mask


def with_thresholds_from_cams(cfg: Config, cam_dir: Path, ids: list[str]) -> Config:
    """``cfg`` with the two thresholds ``refine.thresholds`` asks for: as configured (fixed), or
    the rule's (otsu, yen: :func:`cam_thresholds`) from the CAMs of the train ``ids`` (under
    torchrun, each process's share: the histogram is summed over the processes, so every process
    gets the same thresholds)."""
    if cfg.refine.thresholds == "fixed":
        return cfg
    histogram = np.zeros(MAX_CAM_BINS, dtype=np.int64)
    for image_id in ids:
        histogram += max_cam_histogram(load_cams(cam_dir, image_id)[0])
    thresholds = cam_thresholds(sum_across_ranks(histogram), cfg.refine.thresholds)
    if thresholds is None:
        if is_main_process():
            print(f"refine: the train CAMs give the {cfg.refine.thresholds} rule nothing to split (too few "
                  f"distinct values); using refine.fg_threshold {cfg.refine.fg_threshold} and bg_threshold "
                  f"{cfg.refine.bg_threshold}", file=sys.stderr)
        return cfg
    high, low = thresholds
    refine = dataclasses.replace(cfg.refine, fg_threshold=round(high, 4), bg_threshold=round(low, 4))
    return dataclasses.replace(cfg, refine=refine)


def save_and_score(image_id: str, mask: np.ndarray, data: DataConfig, scored: set[str], out_dir: Path):
    """Writes one mask; returns its :func:`mask_scores`."""
    save_mask(out_dir / f"{image_id}.png", mask)
    return mask_scores(image_id, mask, data, scored)


def mask_scores(image_id: str, mask: np.ndarray, data: DataConfig, scored: set[str]):
    """One mask's confusion matrices (zero when the id is not scored: unsure as background, and
    confident pixels only) and its unsure and total pixel counts, as :func:`collect_scores` sums
    them."""
    counts = int((mask == IGNORE).sum()), mask.size
    if image_id not in scored:
        return (0, 0) + counts
    dataset = open_dataset(data)
    gt = dataset.load_mask(image_id)
    as_background = np.where(mask == IGNORE, 0, mask).astype(np.uint8)
    return (confusion_matrix(gt, as_background, dataset.num_classes),
            confident_confusion_matrix(gt, mask, dataset.num_classes)) + counts


def written(out_dir: Path, image_id: str, keep: bool) -> np.ndarray | None:
    """With ``keep``, the mask already in the folder (written atomically, so complete: by a run
    that was killed, or by the same method before only the scoring changed), else None."""
    path = out_dir / f"{image_id}.png"
    return load_mask(path) if keep and path.is_file() else None


def _crf_mask_one(image_id: str, data: DataConfig, scored: set[str], cam_dir: Path, out_dir: Path,
                  make_mask: MaskMaker, keep: bool):
    """Worker task: the CRF mask of one image (``make_mask(image, cams, classes)``), written and scored."""
    mask = written(out_dir, image_id, keep)
    if mask is None:
        cams, classes = load_cams(cam_dir, image_id)
        mask = make_mask(open_dataset(data).load_image(image_id), cams, classes)
    return save_and_score(image_id, mask, data, scored, out_dir)


def collect_scores(results: Iterable, total: int, class_names: list[str], desc: str) -> dict:
    """Sums the workers' confusion matrices into the masks' scores; times the whole pass."""
    started = time.perf_counter()
    confusion = np.zeros((len(class_names),) * 2, dtype=np.int64)
    confident = confusion.copy()
    unsure = pixels = scored = 0
    for cm, cm_sure, n_unsure, n_pixels in tqdm(results, total=total, desc=desc, leave=False,
                                                disable=not is_main_process()):
        confusion, confident = confusion + cm, confident + cm_sure
        unsure, pixels = unsure + n_unsure, pixels + n_pixels
        scored += not isinstance(cm, int)  # unscored ids return 0 for their matrices
    # Under torchrun each process scored its share: the sums are the whole split's.
    confusion, confident = sum_across_ranks(confusion), sum_across_ranks(confident)
    unsure, pixels, scored = (sum_across_ranks(unsure), sum_across_ranks(pixels), sum_across_ranks(scored))
    counts = {"unsure_fraction": round(unsure / max(pixels, 1), 4),
              "seconds_per_image": round((time.perf_counter() - started) / max(total, 1), 4)}
    if not scored:
        return not_scored("no masks") | counts
    confident_scores = iou_scores(confident, class_names)
    return iou_scores(confusion, class_names) | counts | {
        "scored_images": scored,
        "confident_miou": confident_scores["miou"],
        "confident_per_class_iou": confident_scores["per_class_iou"],
    }


def write_crf_masks(cfg: Config, run_dir: Path, ids: list[str], out_dir: Path, keep: bool,
                    make_mask: MaskMaker | None = None) -> dict:
    """The CRF masks of ``ids`` in ``out_dir``, scored: refine's two thresholds
    (:func:`pseudo_mask`), or ``make_mask``; ``keep`` keeps the masks already there."""
    dataset = open_dataset(cfg.data)
    out_dir.mkdir(exist_ok=True)  # a new partial folder is empty; under torchrun every process makes it
    task = functools.partial(_crf_mask_one, data=cfg.data, scored=score_ids(cfg.data, dataset),
                             cam_dir=run_dir / "cam" / "cams", out_dir=out_dir,
                             make_mask=make_mask or functools.partial(pseudo_mask, cfg=cfg.refine), keep=keep)
    with parallel_map(task, ids, cfg.refine.workers) as results:
        scores = collect_scores(results, len(ids), dataset.classes, "refine (CRF)")
    return scores | {"workers": cfg.refine.workers}


def with_gain(scores: dict, cam_miou: float | None) -> dict:
    """``scores`` with ``cam_miou`` (the CAMs' own score, from cam's metrics.json) and
    ``gain_over_cam``: how far these masks' mIoU (unsure counted as background, the argmax
    protocol of PSA and IRNet) lies above the CAMs they were made from."""
    if scores.get("miou") is None or cam_miou is None:
        return scores
    return scores | {"cam_miou": cam_miou, "gain_over_cam": round(scores["miou"] - cam_miou, 4)}
