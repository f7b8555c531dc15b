#!/usr/bin/env python
"""A finished seg run scored on the train split's masks, to choose settings without touching
val: loads ``<run-dir>/seg/model.pt`` into the network the config describes (a mixed run's
student and teacher both) and prints the mIoU of its predictions on the ids the cam and refine
stages score (``data.score_split``, default the train split; per 3-D volume too where
``data.volume_pattern`` groups slices, and post-processed as the seg stage does with
``seg.largest_component``); ``--json FILE`` also writes the
scores ({branch: {"miou", "per_class_iou"}}) to FILE. Give the same --config, --mode and --set
as the run; a model that does not match them is an error:

    python tools/score_seg_on_train.py --mode mixed --run-dir runs/demo-mixed-seed0 [--json FILE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.config import MODES
from pipeline.core.config_file import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json
from pipeline.core.runtime import configure_threads, select_device
from pipeline.core.training import load_checkpoint
from pipeline.data.dataset import open_dataset, score_ids
from pipeline.data.volumes import Volumes
from pipeline.models.networks import segmentation_network
from stages.seg import predict_and_score
from tools import report_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--json", help="write the scores to this file too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, args.mode)
        checkpoint = Path(args.run_dir) / "seg" / "model.pt"
        if not checkpoint.is_file():
            raise PipelineError(f"{checkpoint} does not exist: run the seg stage first")
        configure_threads(cfg.num_threads)
        dataset, device = open_dataset(cfg.data), select_device(cfg.device)
        model = segmentation_network(cfg, dataset.num_classes, training=False)
        try:
            load_checkpoint(checkpoint, model)
        except RuntimeError as error:
            detail = " ".join(str(error).split())  # torch's message spans lines; the error is one line
            raise PipelineError(f"{checkpoint} does not match the config's network: {detail[:300]}") from None
        ids = sorted(score_ids(cfg.data, dataset))
        volumes = Volumes(cfg.data, dataset.root) if cfg.data.volume_pattern else None
        scores = predict_and_score(model.to(device), dataset, ids, cfg.seg.flip_predict, device, None,
                                   volumes,
                                   crf=cfg.refine.crf if cfg.seg.crf_predict else None,
                                   largest_component=cfg.seg.largest_component)
    except (PipelineError, OSError, ValueError) as error:
        return report_error(error)
    results = {branch: score.result() for branch, score in scores.items()}
    if args.json:
        atomic_write_json(args.json, {branch: {key: result[key] for key in ("miou", "per_class_iou")}
                                      for branch, result in results.items()})
    for branch, result in results.items():
        per_class = "  ".join(f"{name} {'-' if iou is None else f'{100 * iou:.1f}'}"  # None: absent
                              for name, iou in result["per_class_iou"].items())
        print(f"{branch:<20} train mIoU {100 * result['miou']:.1f}   {per_class}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
