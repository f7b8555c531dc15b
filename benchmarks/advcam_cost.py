#!/usr/bin/env python
"""AdvCAM (cam.advcam) on a finished cam network: its cost on this machine and its CAMs' train
mIoU, beside the plain CAMs of the same images.

AdvCAM reads the CAMs of the same trained network (ReCAM's too, with cam.recam.enabled), so each
variant loads ``<cam-run>/cam/model.pt``, computes the CAMs of ``--images`` scored train images,
evenly spaced over the sorted ids, as the cam stage does, and scores them as
``recam_variants.py`` does: the threshold sweep, and Otsu's and Yen's thresholds of these
images' own max-CAM histogram. Variant ``plain`` is AdvCAM off; any other starts from the
authors' settings (AdvCamConfig's defaults) whatever ``--config`` sets, then its own
``cam.advcam.*`` keys. ``projected_train_split_s`` is the seconds per image times the train
split's images: what the cam stage's inference would take. Each finished variant is saved into
``--out`` at once; a rerun skips those there.

    python benchmarks/advcam_cost.py --config configs/msrc.yaml --set data.root=../shared/data/msrc-dev \\
        --cam-run runs/msrc --out runs/advcam.json --images 12 \\
        --variant plain --variant authors --variant steps8:cam.advcam.iterations=8
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from recam_variants import finished_cam_network, run_resumable, score_cams, variant_configs, variant_parser

from pipeline.core.config import AdvCamConfig
from pipeline.core.errors import PipelineError
from pipeline.core.training import load_checkpoint
from pipeline.data.dataset import score_ids
from pipeline.models.networks import CAMNet


def parse_args(argv):
    parser = variant_parser(__doc__, "cam.advcam.* settings; 'plain': AdvCAM off")
    parser.add_argument("--images", type=int, default=12,
                        help="N scored train images, evenly spaced over the sorted ids")
    return parser.parse_args(argv)


def run_variant(cfg, dataset, device, model_file: Path, images: int) -> dict:
    model = CAMNet(cfg.cam.backbone, dataset.num_classes - 1, recam=cfg.cam.recam.enabled).to(device)
    load_checkpoint(model_file, model)
    scored = sorted(score_ids(cfg.data, dataset))
    ids = scored[::max(1, len(scored) // images)][:images]  # spread: sorted ids run class by class
    scores = score_cams(model, cfg, dataset, device, ids)
    train_images = len(dataset.split_ids(cfg.data.train_split))
    return {"advcam": dataclasses.asdict(cfg.cam.advcam), "images": ids, "scales": cfg.cam.scales,
            "classes_per_image": sum(len(dataset.image_labels(i)) for i in ids) / len(ids),
            "projected_train_split_s": round(scores["cam_seconds_per_image"] * train_images)} | scores


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        configs = variant_configs(args, "advcam", AdvCamConfig(), "plain")
        model_file = finished_cam_network(args.cam_run)
        if args.images < 1:
            raise PipelineError(f"--images {args.images}: give 1 or more")
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_resumable(args.out, {name: cfg for name, (cfg, _) in configs.items()},
                  lambda _, cfg, dataset, device: run_variant(cfg, dataset, device, model_file, args.images),
                  lambda r: f"{r['cam_seconds_per_image']} s per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
