#!/usr/bin/env python
"""ReCAM's settings on a finished cam network: train CAM mIoU per variant, without retraining it.

ReCAM (cam.recam) trains after the CAM network, which trains exactly as without it
(tests/test_pipeline.py checks the losses). So each variant here loads ``<cam-run>/cam/model.pt``,
trains ReCAM's epochs with the variant's ``cam.recam.*`` settings through the cam stage's own
functions, computes the train CAMs as the stage does and scores them over cam's threshold sweep.
The random state at ReCAM's start is ``seed`` freshly seeded, not what the CAM training left, so a
variant's number can differ from the pipeline's by that draw; the chosen one is then run with the
pipeline. Every variant's ``cam.recam`` starts from the authors' settings, whatever ``--config``
sets. Each finished variant is saved into ``--out`` at once; a rerun skips those there.

    python benchmarks/recam_variants.py --config configs/msrc.yaml --set data.root=../shared/data/msrc-dev \\
        --cam-run runs/msrc --out runs/recam-variants.json \\
        --variant authors --variant lr0.05:cam.recam.lr=0.05 --variant ...
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.config import ReCamConfig
from pipeline.core.config_file import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json
from pipeline.core.metrics import iou_scores
from pipeline.core.runtime import configure_threads, seed_everything, select_device
from pipeline.core.training import load_checkpoint, loss_curve, make_train_loader
from pipeline.data.dataset import open_dataset, score_ids
from pipeline.data.training_set import TrainingSet, normalize
from pipeline.methods.cams import MAX_CAM_BINS, max_cam_histogram
from pipeline.models.networks import CAMNet
from stages.cam import (
    THRESHOLD_SWEEP,
    add_threshold_confusions,
    label_free_scores,
    stage_cams,
    threshold_sweep,
    train_recam,
)


def parse_args(argv):
    return variant_parser(__doc__, "cam.recam.* settings; 'none': no ReCAM").parse_args(argv)


def variant_parser(doc: str, variant_help: str) -> argparse.ArgumentParser:
    """The arguments of the benchmarks that try variants on a finished cam network (this one,
    advcam_cost.py)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cam-run", required=True, type=Path, help="a run folder with a finished cam stage")
    parser.add_argument("--out", required=True, type=Path, help="results JSON (read, extended, rewritten)")
    parser.add_argument("--variant", action="append", required=True,
                        help=f"NAME or NAME:KEY=VALUE,KEY=VALUE ({variant_help})")
    return parser


def score_cams(model, cfg, dataset, device, ids: list[str] | None = None) -> dict:
    """The train CAMs scored as the cam stage scores them (float16 maps, the threshold sweep,
    and the label-free thresholds of their own max-CAM histogram: the stage's ``otsu_miou``,
    ``yen_miou``), on ``ids`` (default: every scored train image), with the seconds per image."""
    confusions = {t: np.zeros((dataset.num_classes,) * 2, np.int64) for t in THRESHOLD_SWEEP}
    histogram, kept = np.zeros(MAX_CAM_BINS, dtype=np.int64), {}  # id -> (CAMs, classes, mask)
    model.eval()
    started = time.perf_counter()
    ids = sorted(score_ids(cfg.data, dataset)) if ids is None else ids
    for image_id in tqdm(ids, desc="cams", leave=False):
        classes = dataset.image_labels(image_id)
        image = normalize(dataset.load_image(image_id)).to(device)
        cams = stage_cams(model, image, classes, cfg.cam).astype(np.float16)
        cams, gt = cams.astype(np.float32), dataset.load_mask(image_id)
        kept[image_id] = (cams, classes, gt)
        histogram += max_cam_histogram(cams)
        add_threshold_confusions(confusions, gt, cams, classes, dataset.num_classes)
    seconds = {"cam_seconds_per_image": round((time.perf_counter() - started) / max(len(kept), 1), 2)}
    sweep = threshold_sweep(confusions, dataset.classes)
    best = confusions[sweep["best_bg_threshold"]]
    scores = sweep | {"per_class_iou_at_best": iou_scores(best, dataset.classes)["per_class_iou"]}
    return seconds | scores | label_free_scores(histogram, kept.values(), dataset.classes)


def run_variant(cfg, dataset, device, model_file: Path) -> dict:
    seed_everything(cfg.seed)
    model = CAMNet(cfg.cam.backbone, dataset.num_classes - 1).to(device)
    try:
        load_checkpoint(model_file, model)
    except RuntimeError:
        print(f"error: {model_file} is not a plain CAM network of this config (one trained with ReCAM "
              "already, or another backbone): give a run made with cam.recam.enabled=false", file=sys.stderr)
        sys.exit(2)
    started, curves = time.perf_counter(), {}
    if cfg.cam.recam.enabled:
        generator = seed_everything(cfg.seed)
        train_set = TrainingSet(dataset, dataset.split_ids(cfg.data.train_split), cfg.cam.train)
        loader = make_train_loader(train_set, cfg.cam.train, cfg.data.loader_workers, generator)
        history = train_recam(cfg.cam, model, loader, device)
        curves = {name: loss_curve(history, name) for name in ("multilabel", "ce")}
    trained = time.perf_counter()
    scores = score_cams(model, cfg, dataset, device)
    return {"recam": dataclasses.asdict(cfg.cam.recam), "recam_train_s": round(trained - started, 1),
            "cam_inference_s": round(time.perf_counter() - trained, 1), "losses": curves} | scores


def parse_variant(variant: str) -> tuple[str, list[str]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` -> (name, overrides); a comma inside brackets belongs to a
    list value (``cam.sr.exits=[layer2, layer3]``)."""
    name, _, settings = variant.partition(":")
    return name, [s for s in re.split(r",(?![^\[]*\])", settings) if s]


def variant_configs(args, section: str = "recam", authors=ReCamConfig(), off: str = "none") -> dict:
    """Each variant's (config, its own overrides), loaded before any work: ``cam.<section>``
    starts from the authors' settings (``authors``, its config class's defaults) whatever
    ``--config`` sets; then ``--set``, then the variant's keys. Variant ``off`` switches the
    section off."""
    defaults = [f"cam.{section}.{key}={value}" for key, value in dataclasses.asdict(authors).items()
                if key != "enabled"]
    configs = {}
    for variant in args.variant:
        name, overrides = parse_variant(variant)
        enabled = "false" if name == off else "true"
        switch = [f"cam.{section}.enabled={enabled}"]
        configs[name] = (load_config(args.config, defaults + args.overrides + switch + overrides), overrides)
    return configs


def finished_cam_network(cam_run: Path) -> Path:
    model_file = cam_run / "cam" / "model.pt"
    if not model_file.is_file():
        raise PipelineError(f"{model_file} does not exist: give a run folder with a finished cam stage")
    return model_file


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        configs = variant_configs(args)
        model_file = finished_cam_network(args.cam_run)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_resumable(args.out, {name: cfg for name, (cfg, _) in configs.items()},
                  lambda name, cfg, dataset, device: run_variant(cfg, dataset, device, model_file)
                  | {"overrides": configs[name][1]},
                  lambda r: f"ReCAM {r['recam_train_s']} s, CAMs {r['cam_inference_s']} s")
    return 0


def run_resumable(out: Path, configs: dict, run_one, describe) -> None:
    """Runs ``run_one(name, cfg, dataset, device)`` per variant not yet in the ``out`` JSON and
    saves each result there at once, so that a killed run resumes after its last variant."""
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name, cfg in configs.items():
        if name in results:
            print(f"{name}: done before, best {100 * results[name]['best_miou']:.1f}")
            continue
        configure_threads(cfg.num_threads)
        dataset, device = open_dataset(cfg.data), select_device(cfg.device)
        results[name] = run_one(name, cfg, dataset, device)
        atomic_write_json(out, results)
        r = results[name]
        print(f"{name}: CAM best {100 * r['best_miou']:.1f} at {r['best_bg_threshold']}, {describe(r)}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
