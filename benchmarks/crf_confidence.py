#!/usr/bin/env python
"""CLIP-ES's confidence rule on refine's CRF masks, without rerunning refine.

CLIP-ES (Lin et al., CVPR 2023; linyq2117/CLIP-ES eval_cam_with_crf.py) leaves a pixel of its
pseudo masks unlabelled where the CRF's largest marginal is below 0.95, so that the segmentation
network learns from confident pixels only (its "confidence-guided loss"). Here the rule is put
on the pipeline's own masks: refine's two-threshold CRF masks (pipeline/refinement/masks.py,
``--fg`` / ``--bg``: the thresholds in the run's refine/metrics.json), remade in memory with the
marginals of the high-threshold CRF kept, then each pixel whose largest marginal is below tau
made unsure. For each tau: mIoU with unsure as background (refine's score), mIoU over the sure
pixels, the unsure share, and the IoU over sure pixels of the ``--classes`` named:

    python benchmarks/crf_confidence.py --data-root ../shared/data/msrc-dev --config configs/msrc.yaml \\
        --run runs/msrc-otsu-seed1 --fg 0.431 --bg 0.203 --tau 0 0.8 0.9 0.95 --classes face body
"""
from __future__ import annotations

import argparse

import numpy as np
from region_snapping import add_refine_run_arguments
from tqdm import tqdm

from pipeline.core.config_file import load_config
from pipeline.core.metrics import confident_confusion_matrix, confusion_matrix, iou_scores
from pipeline.data.dataset import IGNORE, VOCDataset
from pipeline.methods.cams import cam_argmax, load_cams
from pipeline.methods.crf import crf_label_marginals, crf_refine_labels
from pipeline.refinement.masks import combine_confident


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_refine_run_arguments(parser)
    parser.add_argument("--tau", type=float, nargs="+", default=[0.0, 0.8, 0.9, 0.95])
    parser.add_argument("--classes", nargs="*", default=[])
    return parser.parse_args()


def masks_by_tau(image, cams, classes, crf, fg: float, bg: float, taus: list[float]) -> dict:
    """Refine's CRF mask of one image, and for each tau the same with the pixels whose
    high-threshold CRF marginal is below tau made unsure."""
    if len(classes) == 0:
        return {tau: np.zeros(image.shape[:2], np.uint8) for tau in taus}
    num_labels = len(classes) + 1
    marginals = crf_label_marginals(image, cam_argmax(cams, fg), num_labels, crf)
    mask = combine_confident(marginals.argmax(axis=0), crf_refine_labels(image, cam_argmax(cams, bg),
                                                                         num_labels, crf), classes)
    confidence = marginals.max(axis=0)
    return {tau: np.where(confidence < tau, IGNORE, mask).astype(np.uint8) for tau in taus}


def main():
    args = parse_args()
    dataset = VOCDataset(args.data_root)
    crf = load_config(args.config).refine.crf
    shape = (dataset.num_classes,) * 2
    as_background = {tau: np.zeros(shape, np.int64) for tau in args.tau}
    sure = {tau: np.zeros(shape, np.int64) for tau in args.tau}
    unsure = dict.fromkeys(args.tau, 0)
    pixels = 0
    for image_id in tqdm(dataset.with_masks(dataset.split_ids("train")), desc="images"):
        image, gt = dataset.load_image(image_id), dataset.load_mask(image_id)
        cams, classes = load_cams(args.run / "cam" / "cams", image_id)
        pixels += gt.size
        for tau, mask in masks_by_tau(image, cams, classes, crf, args.fg, args.bg, args.tau).items():
            unsure[tau] += int((mask == IGNORE).sum())
            as_background[tau] += confusion_matrix(gt, np.where(mask == IGNORE, 0, mask).astype(np.uint8),
                                                   dataset.num_classes)
            sure[tau] += confident_confusion_matrix(gt, mask, dataset.num_classes)
    for tau in args.tau:
        scores = iou_scores(as_background[tau], dataset.classes)
        sure_scores = iou_scores(sure[tau], dataset.classes)
        named = "  ".join(f"{name} {100 * (sure_scores['per_class_iou'][name] or 0):.1f}"
                          for name in args.classes)
        print(f"tau {tau:<5g} mIoU {100 * scores['miou']:.2f}  sure pixels {100 * sure_scores['miou']:.2f}  "
              f"unsure {100 * unsure[tau] / pixels:.1f}%  {named}")


if __name__ == "__main__":
    main()
