#!/usr/bin/env python
"""PSA's pair labels with the label CRF's kernels scaled to the image size, without training.

PSA's label CRF (``refine.affinity.label_crf``: bilateral sxy 80, Gaussian sxy 3) was set for
VOC's ~500 px images. This remakes the pair-label masks an AffinityNet would learn from
(pipeline/refinement/psa.py ``psa_label_mask``: the CRF at the two ``label_powers``) from a
finished cam stage's CAMs, with both position kernels multiplied by each ``--scales`` factor
(colour kernel unchanged), and scores them on the train masks as refine scores them (unsure as
background; over the sure pixels; unsure share). Nothing is written.

    python benchmarks/pair_label_kernels.py --config configs/msrc.yaml \\
        --set data.root=../shared/data/msrc-dev --run runs/msrc-now --scales 1 0.64 0.4
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

from pipeline.core.config_file import load_config
from pipeline.core.runtime import configure_threads, parallel_map
from pipeline.data.dataset import open_dataset
from pipeline.methods.cams import load_cams
from pipeline.refinement.masks import collect_scores, mask_scores
from pipeline.refinement.psa import psa_label_mask


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run", required=True, type=Path, help="a run folder with a finished cam stage")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    return parser.parse_args()


def score_one(image_id: str, cfg, cam_dir: Path, affinity) -> tuple:
    """The pair-label mask of one train image, scored as refine's workers score a mask."""
    cams, classes = load_cams(cam_dir, image_id)
    mask = psa_label_mask(open_dataset(cfg.data).load_image(image_id), cams, classes, affinity)
    return mask_scores(image_id, mask, cfg.data, {image_id})


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.overrides)
    configure_threads(cfg.num_threads)
    dataset = open_dataset(cfg.data)
    ids = dataset.with_masks(dataset.split_ids(cfg.data.train_split))
    base = cfg.refine.affinity.label_crf
    for scale in args.scales:
        crf = dataclasses.replace(base, bilateral_sxy=base.bilateral_sxy * scale,
                                  gaussian_sxy=base.gaussian_sxy * scale)
        affinity = dataclasses.replace(cfg.refine.affinity, label_crf=crf)
        task = functools.partial(score_one, cfg=cfg, cam_dir=args.run / "cam" / "cams", affinity=affinity)
        with parallel_map(task, ids, cfg.refine.workers) as results:
            scores = collect_scores(results, len(ids), dataset.classes, "pair labels")
        print(f"scale {scale:g} (bilateral sxy {crf.bilateral_sxy:.1f}, "
              f"gaussian sxy {crf.gaussian_sxy:.2f}): "
              f"mIoU {100 * scores['miou']:.1f}, over the sure pixels {100 * scores['confident_miou']:.1f}, "
              f"unsure {100 * scores['unsure_fraction']:.1f}%, {scores['seconds_per_image']:.2f} s per image",
              flush=True)


if __name__ == "__main__":
    main()
