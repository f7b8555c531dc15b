#!/usr/bin/env python
"""Region snapping's choices on a finished refine stage's masks, without rerunning refine.

Each variant votes the CRF masks in ``<run>/refine/pseudo/`` (made with ``refine.regions`` off)
within image regions, with the pipeline's own vote (pipeline/methods/regions.py), and scores
them as refine does (unsure as background) on the train masks: Felzenszwalb at several k,
SLIC at several region sizes, and ``pool``: the CAMs averaged within Felzenszwalb regions
(all of the region mean, or half of it mixed with the pixel's own CAM) before refine's two
thresholds and CRF (``--fg`` / ``--bg``: the thresholds the run's refine used, in its
metrics.json). Prints one line per variant, mIoU and the mean without ``--without`` classes.

    python benchmarks/region_snapping.py --data-root ../shared/data/msrc-dev --config configs/msrc.yaml \\
        --run runs/msrc-recam-otsu --fg 0.429 --bg 0.201 --felzenszwalb 50 100 200 300 500 1000 \\
        --slic 8 12 16 24 --pool 100:1.0 200:0.5 --without horse
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from skimage.segmentation import slic
from tqdm import tqdm

from pipeline.core.config import RegionsConfig
from pipeline.core.config_file import load_config
from pipeline.core.io import load_mask
from pipeline.core.metrics import confusion_matrix, iou_scores
from pipeline.data.dataset import IGNORE, VOCDataset
from pipeline.methods.cams import load_cams
from pipeline.methods.regions import image_regions, vote_in_regions
from pipeline.refinement.masks import pseudo_mask


def add_refine_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a benchmark that remakes a finished run's refine masks in memory."""
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--config", required=True, help="the run's config (refine.crf's kernels)")
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--fg", type=float, required=True, help="refine's high threshold in the run")
    parser.add_argument("--bg", type=float, required=True, help="refine's low threshold in the run")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_refine_run_arguments(parser)
    parser.add_argument("--felzenszwalb", type=float, nargs="*", default=[], metavar="K")
    parser.add_argument("--slic", type=int, nargs="*", default=[], metavar="SIZE", help="region side, px")
    parser.add_argument("--pool", nargs="*", default=[], metavar="K:SHARE")
    parser.add_argument("--without", nargs="*", default=[], metavar="CLASS")
    return parser.parse_args()


def pooled(cams: np.ndarray, regions: np.ndarray, share: float) -> np.ndarray:
    """Each CAM mixed with its mean within each region (``share`` of the mean)."""
    area = np.bincount(regions.ravel()).clip(1)
    means = [np.bincount(regions.ravel(), cam.ravel(), minlength=len(area)) / area for cam in cams]
    mixed = [share * mean[regions] + (1 - share) * cam for mean, cam in zip(means, cams)]
    return np.stack(mixed).astype(np.float32)


def main():
    args = parse_args()
    dataset = VOCDataset(args.data_root)
    refine = load_config(args.config).refine
    refine = dataclasses.replace(refine, fg_threshold=args.fg, bg_threshold=args.bg)
    variants = (["crf masks"] + [f"felzenszwalb k={k:g}" for k in args.felzenszwalb]
                + [f"slic {s}px" for s in args.slic] + [f"pool k={p}" for p in args.pool])
    confusion = {name: np.zeros((dataset.num_classes,) * 2, np.int64) for name in variants}
    pools = [(item, *(float(value) for value in item.split(":"))) for item in args.pool]  # (name, k, share)
    for image_id in tqdm(dataset.with_masks(dataset.split_ids("train")), desc="images"):
        image, gt = dataset.load_image(image_id), dataset.load_mask(image_id)
        mask = load_mask(args.run / "refine" / "pseudo" / f"{image_id}.png")
        made = {"crf masks": mask}
        # each k's regions once, shared by the vote and the pooled CAMs
        regions_at = {k: image_regions(image, RegionsConfig(True, scale=k))
                      for k in {*args.felzenszwalb, *(k for _, k, _ in pools)}}
        for k in args.felzenszwalb:
            made[f"felzenszwalb k={k:g}"] = vote_in_regions(mask, regions_at[k])
        for size in args.slic:
            regions = slic(image, n_segments=max(1, round(mask.size / size ** 2)), compactness=10,
                           start_label=0)
            made[f"slic {size}px"] = vote_in_regions(mask, regions)
        cams, classes = load_cams(args.run / "cam" / "cams", image_id)
        for item, k, share in pools:  # an image without classes is all background either way
            made[f"pool k={item}"] = (pseudo_mask(image, pooled(cams, regions_at[k], share), classes, refine)
                                      if len(classes) else mask)
        for name, result in made.items():
            confusion[name] += confusion_matrix(gt, np.where(result == IGNORE, 0, result).astype(np.uint8),
                                                dataset.num_classes)
    kept = [i for i, name in enumerate(dataset.classes) if name not in args.without]
    for name in variants:
        scores = iou_scores(confusion[name], dataset.classes)
        per_class = [scores["per_class_iou"][dataset.classes[i]] for i in kept]
        per_class = [value for value in per_class if value is not None]  # None: absent from the masks
        print(f"{name:<24} mIoU {100 * scores['miou']:.2f}   without {','.join(args.without) or '-'}: "
              f"{100 * np.mean(per_class):.2f}")


if __name__ == "__main__":
    main()
