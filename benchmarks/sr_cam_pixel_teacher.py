#!/usr/bin/env python
"""Self-Regulation in the CAM classifier with a teacher that has learnt to localise: a second
cam round whose SR exits also learn, per pixel, from a finished run's pseudo masks.

On photos the shallow exits of a CAM network trained from tags alone mark nothing of their
class, so Operation II pulls the CAMs toward noise (docs/results.md, "Self-Regulation in the
CAM classifier"). Here every auxiliary exit's map of class k is also trained, by binary
cross-entropy over the labelled pixels, to say "class k" where ``<masks-run>/refine/pseudo``
says so (pipeline/methods/self_regulation.py, ``cam_exit_mask_loss``, weight ``cam.sr.w_seg``),
as the authors' segmenter exits learn from pixel labels. The main exit stays a CAM classifier
trained on tags; it learns from the exits only through Operation II (and the shared backbone).

Each variant trains a fresh CAM network as the cam stage does (``cam.train``, then ReCAM's
epochs where ``cam.recam.enabled``), computes the train CAMs as the stage does and scores them
over its threshold sweep and at Otsu's threshold of their own histogram (the threshold a user
without masks gets; ``recam_variants.score_cams``). Each finished
variant is saved into ``--out`` at once; a rerun skips those there. The network with its exits,
before ReCAM's epochs, is kept as ``<out>.<variant>.pt``: ``tools/exit_cams.py --state`` scores
every exit's CAMs and Operation II's target from it.

    python benchmarks/sr_cam_pixel_teacher.py --config configs/msrc.yaml \\
        --set data.root=../shared/data/msrc-dev --masks-run runs/msrc-recam-otsu \\
        --out runs/sr-pixel-teacher.json --variant stem:cam.sr.enabled=true ...
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
from recam_variants import parse_variant, run_resumable, score_cams

from pipeline.core.config import SRConfig
from pipeline.core.config_file import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.runtime import seed_everything
from pipeline.core.training import loss_curve, make_train_loader, train
from pipeline.data.training_set import MaskFolder, TrainingSet
from pipeline.methods.self_regulation import cam_exit_mask_loss, self_regulation_loss
from pipeline.models.networks import CAMNet
from stages.cam import exits_and_features, train_recam


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--masks-run", required=True, type=Path,
                        help="a run folder with the train split's pseudo masks (refine/pseudo)")
    parser.add_argument("--out", required=True, type=Path, help="results JSON (read, extended, rewritten)")
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME:KEY=VALUE,KEY=VALUE (config keys over --set; w_seg 0: no pixel term)")
    return parser.parse_args(argv)


def pixel_teacher_loss(model, batch, epoch, sr: SRConfig) -> dict:
    """The cam stage's SR loss plus the exits' pixel term against the first round's pseudo masks."""
    exits, features = exits_and_features(model, batch["image"], sr)
    terms = self_regulation_loss(exits, batch["labels"], sr, epoch, input_size=batch["image"].shape[-2:],
                                 features=features)
    pixel = cam_exit_mask_loss([maps for maps, _ in exits[:-1]], batch["mask"])
    return terms | {"loss": terms["loss"] + sr.w_seg * pixel, "exit_pixel": pixel}


def run_variant(cfg, dataset, device, masks: Path, keep: Path) -> dict:
    generator = seed_everything(cfg.seed)
    model = CAMNet(cfg.cam.backbone, dataset.num_classes - 1, cfg.cam.sr).to(device)
    train_set = TrainingSet(dataset, dataset.split_ids(cfg.data.train_split), cfg.cam.train,
                            pixel_labels={"mask": MaskFolder(masks)})
    loader = make_train_loader(train_set, cfg.cam.train, cfg.data.loader_workers, generator)
    started = time.perf_counter()
    history = train(model, loader, functools.partial(pixel_teacher_loss, sr=cfg.cam.sr), cfg.cam.train,
                    device, "cam (pixel teacher)")
    torch.save({"model": model.state_dict()}, keep)  # tools/exit_cams.py's --state, before ReCAM
    curves = {name: loss_curve(history, name) for name in history[-1]}
    if cfg.cam.recam.enabled:
        train_recam(cfg.cam, model, loader, device)
    trained = time.perf_counter()
    model.eval()
    scores = score_cams(model, cfg, dataset, device)
    return {"train_s": round(trained - started, 1), "losses": curves,
            "cam_inference_s": round(time.perf_counter() - trained, 1)} | scores


def main(argv=None) -> int:
    args = parse_args(argv)
    masks = args.masks_run / "refine" / "pseudo"
    try:
        configs = {}
        for variant in args.variant:
            name, overrides = parse_variant(variant)
            configs[name] = load_config(args.config, args.overrides + overrides)
            if not configs[name].cam.sr.enabled:
                raise PipelineError(f"--variant {name} needs cam.sr.enabled=true (its exits learn the masks)")
        if not masks.is_dir():
            raise PipelineError(f"{masks} does not exist: give a run folder with a finished refine stage")
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    def run_one(name, cfg, dataset, device) -> dict:
        keep = args.out.with_name(f"{args.out.stem}.{name}.pt")
        return run_variant(cfg, dataset, device, masks, keep) | {"variant": name}

    run_resumable(args.out, configs, run_one,
                  lambda r: f"Otsu {100 * r.get('otsu_miou', float('nan')):.1f}, train {r['train_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
