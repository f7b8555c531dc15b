#!/usr/bin/env python
"""Every Self-Regulation exit's CAMs of a cam-stage training state, scored, and Operation II's
target: what the shallowest exit's maps mark, the question behind SR in the CAM classifier
helping one data set and hurting another. Loads a training state (``checkpoint.pt`` of a cam
stage's partial folder, which holds the training-only exits that ``model.pt`` leaves out) into
the network the config describes and, on the train images that have masks, scores every exit's
CAMs as the cam stage scores its own (ReLU of the maps of the image's classes, image and mirror
at scale 1, each map divided by its maximum; mIoU at the best background threshold of a sweep,
and the mean share of an image's pixels each class map marks at 0.5: the main exit's are the
stage's CAMs at ``cam.scales: [1.0]``; with ``--fuse LEVEL`` also the main CAM fused with those
exits' CAMs, the element-wise maximum, as LayerCAM's multi-layer maps), and Operation II's
hard target (``sr.form: hard``, the teacher's pixels at or above its map's spatial mean): how
much of it lies on the class
(precision), how much of the class it covers (recall), and its share of the image:

    python tools/exit_cams.py --config configs/msrc.yaml --set data.root=... \
        --set cam.sr.enabled=true ... --state runs/sr17m/c-stem.train-state.pt [--images N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.config import BACKBONE_LEVELS
from pipeline.core.config_file import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import confusion_matrix, iou_scores
from pipeline.core.runtime import configure_threads
from pipeline.data.dataset import open_dataset, score_ids
from pipeline.data.training_set import normalize
from pipeline.methods.cams import cam_to_label
from pipeline.methods.self_regulation import resize
from pipeline.models.networks import CAMNet
from stages.cam import THRESHOLD_SWEEP
from tools import report_error


def exit_maps(model: CAMNet, image: torch.Tensor, channels: torch.Tensor) -> list[torch.Tensor]:
    """Every exit's raw maps of the given classes at its own resolution, shallow -> main: the
    image's and its mirror's (flipped back), 2 x K x h x w."""
    maps = [m[:, channels] for m, _ in model.forward_exits(torch.stack([image, image.flip(-1)]))]
    return [torch.stack([m[0], m[1].flip(-1)]) for m in maps]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--state", required=True, help="a cam stage's training state (checkpoint.pt)")
    parser.add_argument("--images", type=int, default=0, help="score the first N images only (0: all)")
    parser.add_argument("--fuse", action="append", default=[], metavar="LEVEL",
                        help="also score the main CAM fused with this exit's (repeatable): the element-wise "
                             "maximum of the max-normalised maps, as torchcam's fuse_cams (LayerCAM)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.images < 0:
            raise PipelineError(f"--images is {args.images}: give 0 (all) or a number of images")
        if not Path(args.state).is_file():
            raise PipelineError(f"--state {args.state} does not exist")
        cfg = load_config(args.config, args.overrides)
        if not cfg.cam.sr.enabled:
            raise PipelineError("cam.sr.enabled is false: the exits exist only with SR on")
        missing = [level for level in args.fuse if level not in cfg.cam.sr.exits]
        if missing:
            raise PipelineError(f"--fuse {missing[0]}: not one of cam.sr.exits {cfg.cam.sr.exits}")
        configure_threads(cfg.num_threads)
        dataset = open_dataset(cfg.data)
        model = CAMNet(cfg.cam.backbone, dataset.num_classes - 1, cfg.cam.sr)
        try:
            model.load_state_dict(torch.load(args.state, map_location="cpu", weights_only=True)["model"])
        except (RuntimeError, KeyError, OSError) as error:
            detail = " ".join(str(error).split())
            raise PipelineError(f"{args.state} does not match the config's network: {detail[:300]}") from None
    except (PipelineError, OSError, ValueError) as error:
        return report_error(error)
    model.eval()
    names = [level for level in BACKBONE_LEVELS if level in cfg.cam.sr.exits] + ["main"]
    fused = "main+" + "+".join(args.fuse) if args.fuse else None
    n = dataset.num_classes
    scored_names = names + ([fused] if fused else [])
    confusions = {name: {t: np.zeros((n, n), dtype=np.int64) for t in THRESHOLD_SWEEP}
                  for name in scored_names}
    marked = {name: [] for name in scored_names}
    support = {"precision": [], "recall": [], "share": [], "class_share": []}
    ids = sorted(score_ids(cfg.data, dataset))
    ids = ids[:args.images] if args.images else ids
    with torch.no_grad():
        for image_id in ids:
            classes = dataset.image_labels(image_id)
            gt = dataset.load_mask(image_id)
            if len(classes) == 0:  # all background, as the stage scores such an image
                background = confusion_matrix(gt, np.zeros_like(gt), n)
                for name in scored_names:
                    for t in THRESHOLD_SWEEP:
                        confusions[name][t] += background
                continue
            channels = torch.as_tensor(classes, dtype=torch.long) - 1
            image = normalize(dataset.load_image(image_id))
            image_size = image.shape[-2:]
            per_exit = exit_maps(model, image, channels)
            by_name = {}
            for name, maps in zip(names, per_exit):
                # As multiscale_cams makes the stage's CAMs at scale 1: ReLU, then to the image's size.
                cams = resize(F.relu(maps), image_size).sum(0)
                by_name[name] = cams / cams.flatten(1).max(dim=1).values.clamp_min(1e-5)[:, None, None]
            if fused:
                by_name[fused] = torch.stack([by_name[name] for name in ["main"] + args.fuse]).amax(dim=0)
            for name, cams in by_name.items():
                cams = cams.numpy()
                marked[name] += list((cams >= 0.5).mean(axis=(1, 2)))
                for t in THRESHOLD_SWEEP:
                    confusions[name][t] += confusion_matrix(gt, cam_to_label(cams, classes, t), n)
            # The image itself, raw maps at the input size, as Operation II sees them in training.
            teacher = resize(per_exit[0][:1], image_size)[0]
            for k, cls in enumerate(classes):
                on = (teacher[k] >= teacher[k].mean()).numpy()
                truth = gt == cls
                support["precision"].append((on & truth).sum() / max(on.sum(), 1))
                support["recall"].append((on & truth).sum() / max(truth.sum(), 1))
                support["share"].append(on.mean())
                support["class_share"].append(truth.mean())
    print(f"{len(ids)} train images with masks; {args.state}")
    print(f"{'exit':<8} {'best mIoU':>9} {'at bg':>6} {'mIoU at 0.5':>11} {'marked at 0.5':>13}")
    for name in scored_names:
        sweep = {t: iou_scores(confusions[name][t], dataset.classes)["miou"] for t in THRESHOLD_SWEEP}
        best = max(sweep, key=sweep.get)
        print(f"{name:<8} {100 * sweep[best]:9.1f} {best:6.2f} {100 * sweep[0.5]:11.1f} "
              f"{100 * np.mean(marked[name]):12.1f}%")
    share = {key: 100 * np.mean(values) for key, values in support.items()}
    print(f"Operation II's hard target ({names[0]} pixels at or above the map's mean), per (image, class): "
          f"precision {share['precision']:.1f}%, recall {share['recall']:.1f}%, "
          f"share of the image {share['share']:.1f}% (a support drawn at random: precision = the "
          f"class's share of the image, {share['class_share']:.1f}%; recall = its own share)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
