"""Stage cam: train a multi-label classifier on image-level labels, then compute CAMs.

Outputs in ``<run-dir>/cam/``: ``model.pt`` (state_dict), ``cams/<id>.npz`` with
``cams`` (float16, K x H x W, one map per class in the image label, max-normalised) and
``classes`` (the K class indices), and ``metrics.json`` scoring the CAMs on the train
images that have ground truth (used for this score only; without any: "not scored").
With ``cam.sr.enabled`` the classifier trains with Self-Regulation exits
(pipeline/self_regulation.py); the CAMs still come from its main classifier alone.
"""
from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.cache import CHECKPOINT, VOLUME_SCORING_KEYS, StageOutput, section_for_cache
from pipeline.core.config import Config, SRConfig
from pipeline.core.errors import CacheError
from pipeline.core.io import load_arrays, save_arrays
from pipeline.core.metrics import confusion_matrix, iou_scores, not_scored
from pipeline.core.runtime import barrier, is_main_process, seed_everything, select_device, shard, sum_across_ranks
from pipeline.core.training import LossFn, loss_curve, make_train_loader, save_checkpoint, train
from pipeline.data.dataset import open_dataset, score_ids, score_split
from pipeline.data.training_set import TrainingSet, normalize
from pipeline.methods.cams import cam_to_label, multiscale_cams
from pipeline.methods.losses import multilabel_loss
from pipeline.methods.self_regulation import self_regulation_loss
from pipeline.models.backbones import weights_fingerprint
from pipeline.models.networks import CAMNet

NAME = "cam"
# Background thresholds scored on the train images, to report the best one beside the configured one.
THRESHOLD_SWEEP = [round(t, 2) for t in np.arange(0.05, 0.96, 0.05)]


def upstream(cfg: Config) -> list[str]:
    return []


def own_inputs(cfg: Config) -> dict:
    dataset = open_dataset(cfg.data)
    return {"config": section_for_cache(cfg, "seed", "data", "cam", omit=VOLUME_SCORING_KEYS),
            "data_fingerprint": dataset.fingerprint(cfg.data.train_split, [score_split(cfg.data)]),
            "weights_fingerprint": weights_fingerprint(cfg.cam.backbone, "cam.backbone.weights")}


def classification_loss(model, batch, epoch) -> dict:
    return {"loss": multilabel_loss(model(batch["image"]), batch["labels"])}


def sr_classification_loss(model, batch, epoch, sr: SRConfig) -> dict:
    """Self-Regulation without pixel labels: every exit's maps are its CAMs."""
    return self_regulation_loss(model.forward_exits(batch["image"]), batch["labels"], sr, epoch,
                                input_size=batch["image"].shape[-2:])


def training_loss(sr: SRConfig) -> LossFn:
    """The baseline loss, or the Self-Regulation loss when ``sr.enabled``."""
    return functools.partial(sr_classification_loss, sr=sr) if sr.enabled else classification_loss


def load_cams(cam_dir: Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    path = cam_dir / f"{image_id}.npz"
    try:
        arrays = load_arrays(path)
        return arrays["cams"].astype(np.float32), arrays["classes"].astype(np.int64)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise CacheError(f"CAM file {path} is missing or unreadable ({type(error).__name__}); "
                         "recompute it: --stages cam --force") from None


def run(cfg: Config, run_dir: Path) -> dict:
    dataset = open_dataset(cfg.data)
    device = select_device(cfg.device)
    generator = seed_everything(cfg.seed)
    train_ids = dataset.split_ids(cfg.data.train_split)
    scored = score_ids(cfg.data, dataset)
    with StageOutput(run_dir, NAME, own_inputs(cfg) | {"upstream": {}}) as out:
        model = CAMNet(cfg.cam.backbone, dataset.num_classes - 1, cfg.cam.sr).to(device)
        train_set = TrainingSet(dataset, train_ids, cfg.cam.train.crop_size, cfg.cam.train.scale_range,
                                color_jitter=cfg.cam.train.color_jitter)
        loader = make_train_loader(train_set, cfg.cam.train, cfg.data.loader_workers, generator)
        history = train(model, loader, training_loss(cfg.cam.sr), cfg.cam.train, device, "cam", out.dir / CHECKPOINT)
        save_checkpoint(out.dir / "model.pt", model)

        cam_dir = out.dir / "cams"
        cam_dir.mkdir(exist_ok=True)
        thresholds = sorted(set(THRESHOLD_SWEEP) | {cfg.cam.bg_threshold})
        confusions = {t: np.zeros((dataset.num_classes,) * 2, dtype=np.int64) for t in thresholds}
        for image_id in tqdm(shard(train_ids), desc="cam inference", leave=False, disable=not is_main_process()):
            classes = dataset.image_labels(image_id)
            if out.resumed and (cam_dir / f"{image_id}.npz").is_file():  # written, hence complete, before a kill
                cams = load_cams(cam_dir, image_id)[0].astype(np.float16)
            else:
                image = normalize(dataset.load_image(image_id)).to(device)
                cams = multiscale_cams(model, image, classes, cfg.cam.scales, cfg.cam.flip).astype(np.float16)
                save_arrays(cam_dir / f"{image_id}.npz", cams=cams, classes=classes.astype(np.uint8))
            if image_id not in scored:
                continue
            # Score exactly what refine will read: the float16 maps, as load_cams returns them.
            stored = cams.astype(np.float32)
            gt = dataset.load_mask(image_id)
            for t in thresholds:
                confusions[t] = confusions[t] + confusion_matrix(gt, cam_to_label(stored, classes, t), dataset.num_classes)

        confusions = {t: sum_across_ranks(confusion) for t, confusion in confusions.items()}
        barrier()  # every process's CAMs are written
        out.metrics = {"train_loss_by_epoch": loss_curve(history),
                       "cam_bytes_per_image": round(sum(f.stat().st_size for f in cam_dir.glob("*.npz"))
                                                    / max(len(train_ids), 1))}
        if not scored:
            out.metrics |= not_scored("no masks")
        else:
            sweep = {t: iou_scores(confusions[t], dataset.classes)["miou"] for t in thresholds}
            best = max(sweep, key=sweep.get)
            out.metrics |= iou_scores(confusions[cfg.cam.bg_threshold], dataset.classes) | {
                "scored_images": len(scored),
                "bg_threshold": cfg.cam.bg_threshold,
                "best_bg_threshold": best,
                "best_miou": sweep[best],
                "miou_by_bg_threshold": {str(t): round(v, 4) for t, v in sweep.items()},
            }
    return out.metrics
