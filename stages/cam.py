"""Stage cam: train a multi-label classifier on image-level labels, then compute CAMs.

Outputs in ``<run-dir>/cam/``: ``model.pt`` (state_dict), ``cams/<id>.npz`` with
``cams`` (float16, K x H x W, one map per class in the image label, max-normalised) and
``classes`` (the K class indices), and ``metrics.json`` scoring the CAMs on the train
images that have ground truth (used for this score only; without any: "not scored"): at
``cam.bg_threshold``, at every threshold of a sweep, and at the thresholds that need no masks,
Otsu's and Yen's of the train CAMs (``otsu_miou``, ``yen_miou``; refine's high threshold under
``refine.thresholds: otsu`` or ``yen``).
With ``cam.sr.enabled`` the classifier trains with Self-Regulation exits
(pipeline/methods/self_regulation.py); the CAMs still come from its main classifier alone.
With ``cam.recam.enabled`` ReCAM's extra epochs follow, and the CAMs are ReCAM's. With
``cam.advcam.enabled`` they are read by AdvCAM's climb from the same trained network.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from pipeline.core.cache import (
    CHECKPOINT,
    RECAM_CHECKPOINT,
    SCORING_DATA_KEYS,
    StageOutput,
    config_values,
    section_for_cache,
)
from pipeline.core.config import CamConfig, Config, SRConfig, TrainConfig
from pipeline.core.io import save_arrays
from pipeline.core.metrics import confusion_matrix, iou_scores, not_scored
from pipeline.core.runtime import (
    barrier,
    is_main_process,
    seed_everything,
    select_device,
    shard,
    sum_across_ranks,
)
from pipeline.core.training import (
    LossFn,
    load_checkpoint,
    loss_curve,
    make_train_loader,
    save_checkpoint,
    train,
)
from pipeline.data.dataset import open_dataset, score_ids, score_split
from pipeline.data.training_set import TrainingSet, normalize
from pipeline.methods.cams import (
    MAX_CAM_BINS,
    THRESHOLD_RULES,
    adversarial_cams,
    cam_thresholds,
    cam_to_label,
    load_cams,
    max_cam_histogram,
    multiscale_cams,
)
from pipeline.methods.losses import multilabel_loss, recam_loss
from pipeline.methods.self_regulation import self_regulation_loss
from pipeline.models.backbones import weights_fingerprint
from pipeline.models.networks import CAMNet

NAME = "cam"
# The cache version: raised when a release changes what cam computes from the same config and
# data, so that caches made before are stale once (README, "Outputs and the cache").
VERSION = 1
# Background thresholds scored on the train images, to report the best one beside the configured one.
THRESHOLD_SWEEP = [round(t, 2) for t in np.arange(0.05, 0.96, 0.05)]


def upstream(cfg: Config) -> list[str]:
    return []


def own_inputs(cfg: Config) -> dict:
    """The classifier and its CAMs depend on the train split; which masks score them, and at
    which background threshold, is the scoring part (changing it rescores the cached CAMs)."""
    dataset = open_dataset(cfg.data)
    scoring_keys = ("data.score_split", "cam.bg_threshold")
    return {"version": VERSION,
            "config": section_for_cache(cfg, "seed", "data", "cam",
                                        omit=SCORING_DATA_KEYS + scoring_keys + ("data.val_split",)),
            "data_fingerprint": dataset.fingerprint(cfg.data.train_split),
            "weights_fingerprint": weights_fingerprint(cfg.cam.backbone, "cam.backbone.weights"),
            "scoring": {"config": config_values(cfg, *scoring_keys),
                        "data_fingerprint": dataset.fingerprint(scored_splits=[score_split(cfg.data)])}}


def stage_cams(model: CAMNet, image: torch.Tensor, classes: np.ndarray, cam: CamConfig) -> np.ndarray:
    """An image's CAMs as cam.* says: one pass per scale, or AdvCAM's climb (cam.advcam)."""
    if cam.advcam.enabled:
        return adversarial_cams(model, image, classes, cam.scales, cam.flip, cam.advcam)
    return multiscale_cams(model, image, classes, cam.scales, cam.flip)


def classification_loss(model, batch, epoch) -> dict:
    return {"loss": multilabel_loss(model(batch["image"]), batch["labels"])}


def exits_and_features(model, image: torch.Tensor, sr: SRConfig) -> tuple[list, list | None]:
    """The SR exits of a training pass, and the backbone's features where Operation II needs
    them (``sr.detail_target: energy``; None otherwise)."""
    if sr.detail_target == "energy":
        return model.forward_exits(image, with_features=True)
    return model.forward_exits(image), None


def sr_classification_loss(model, batch, epoch, sr: SRConfig) -> dict:
    """Self-Regulation without pixel labels: every exit's maps are its CAMs."""
    exits, features = exits_and_features(model, batch["image"], sr)
    return self_regulation_loss(exits, batch["labels"], sr, epoch, input_size=batch["image"].shape[-2:],
                                features=features)


def training_loss(sr: SRConfig) -> LossFn:
    """The baseline loss, or the Self-Regulation loss when ``sr.enabled``."""
    return functools.partial(sr_classification_loss, sr=sr) if sr.enabled else classification_loss


class ReCamTraining(nn.Module):
    """What ReCAM's extra epochs train: the whole CAM network, with ReCAM's classifier as the
    new layer (its learning rate ten times the network's, train_recam.py:72-74)."""

    def __init__(self, model: CAMNet):
        super().__init__()
        self.model = model

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.model.recam.parameters())

    def forward_recam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_recam(x)


def recam_training_loss(model, batch, epoch, loss_weight: float) -> dict:
    """ReCAM's loss (train_recam.py:91-95): the multi-label loss plus the weighted softmax one."""
    logits, class_logits = model.forward_recam(batch["image"])
    multilabel = multilabel_loss(logits, batch["labels"])
    softmax = recam_loss(class_logits, batch["labels"])
    return {"loss": multilabel + loss_weight * softmax, "multilabel": multilabel, "ce": softmax}


def recam_train_config(cam: CamConfig) -> TrainConfig:
    """cam.train's batches, crops and weight decay with ReCAM's epochs, rates and momentum."""
    return dataclasses.replace(cam.train, epochs=cam.recam.epochs, steps=0, optimizer="sgd",
                               lr=cam.recam.lr / 10, head_lr_mult=10.0, momentum=cam.recam.momentum)


def train_recam(cam: CamConfig, model: CAMNet, loader, device, checkpoint: Path | None = None) -> list[dict]:
    """Attaches ReCAM's classifier to the trained ``model`` and trains ReCAM's epochs in place;
    the losses per epoch (:func:`train`'s history)."""
    model.attach_recam()
    model.recam.to(device)
    return train(ReCamTraining(model), loader,
                 functools.partial(recam_training_loss, loss_weight=cam.recam.loss_weight),
                 recam_train_config(cam), device, "recam", checkpoint)


def train_cam_network(cfg: Config, model: CAMNet, loader, device, folder: Path) -> dict:
    """Trains ``model`` in place (and then ReCAM's epochs, with ``cam.recam.enabled``); the
    losses per epoch for metrics.json."""
    history = train(model, loader, training_loss(cfg.cam.sr), cfg.cam.train, device, "cam",
                    folder / CHECKPOINT)
    curves = {"train_loss_by_epoch": loss_curve(history)}
    if cfg.cam.recam.enabled:
        history = train_recam(cfg.cam, model, loader, device, folder / RECAM_CHECKPOINT)
        curves |= {"recam_" + name + "_by_epoch": loss_curve(history, name)
                   for name in ("loss", "multilabel", "ce")}
    return curves


def add_threshold_confusions(confusions: dict, gt: np.ndarray, cams: np.ndarray, classes: np.ndarray,
                             num_classes: int) -> None:
    """Adds one image's confusion matrix at every background threshold of ``confusions``."""
    for t in confusions:
        confusions[t] = confusions[t] + confusion_matrix(gt, cam_to_label(cams, classes, t), num_classes)


def threshold_sweep(confusions: dict, class_names: list[str]) -> dict:
    """The mIoU at each background threshold and the best of them."""
    sweep = {t: iou_scores(confusion, class_names)["miou"] for t, confusion in confusions.items()}
    best = max(sweep, key=sweep.get)
    return {"best_bg_threshold": best, "best_miou": sweep[best],
            "miou_by_bg_threshold": {str(t): round(v, 4) for t, v in sweep.items()}}


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    """``force``: compute everything again, even what a finished folder under the same key holds."""
    dataset = open_dataset(cfg.data)
    device = select_device(cfg.device)
    generator = seed_everything(cfg.seed)
    train_ids = dataset.split_ids(cfg.data.train_split)
    scored = score_ids(cfg.data, dataset)
    with StageOutput(run_dir, NAME, own_inputs(cfg) | {"upstream": {}}, reuse=not force) as out:
        if out.reused:  # only the scoring changed: the classifier and its CAMs are the ones there
            model = CAMNet(cfg.cam.backbone, dataset.num_classes - 1, recam=cfg.cam.recam.enabled).to(device)
            load_checkpoint(out.dir / "model.pt", model)
            curves = {k: v for k, v in out.previous_metrics.items() if k.endswith("_by_epoch")}
        else:
            model = CAMNet(cfg.cam.backbone, dataset.num_classes - 1, cfg.cam.sr).to(device)
            train_set = TrainingSet(dataset, train_ids, cfg.cam.train)
            loader = make_train_loader(train_set, cfg.cam.train, cfg.data.loader_workers, generator)
            curves = train_cam_network(cfg, model, loader, device, out.dir)
            save_checkpoint(out.dir / "model.pt", model)

        cam_dir = out.dir / "cams"
        cam_dir.mkdir(exist_ok=True)
        thresholds = sorted(set(THRESHOLD_SWEEP) | {cfg.cam.bg_threshold})
        confusions = {t: np.zeros((dataset.num_classes,) * 2, dtype=np.int64) for t in thresholds}
        histogram = np.zeros(MAX_CAM_BINS, dtype=np.int64)
        for image_id in tqdm(shard(train_ids), desc="cam inference", leave=False,
                             disable=not is_main_process()):
            classes = dataset.image_labels(image_id)
            # Written, hence complete, before a kill; or made by the same classifier (reused).
            if (out.resumed or out.reused) and (cam_dir / f"{image_id}.npz").is_file():
                cams = load_cams(cam_dir, image_id)[0].astype(np.float16)
            else:
                image = normalize(dataset.load_image(image_id)).to(device)
                cams = stage_cams(model, image, classes, cfg.cam).astype(np.float16)
                save_arrays(cam_dir / f"{image_id}.npz", cams=cams, classes=classes.astype(np.uint8))
            histogram += max_cam_histogram(cams.astype(np.float32))
            if image_id not in scored:
                continue
            # Score exactly what refine will read: the float16 maps, as load_cams returns them.
            add_threshold_confusions(confusions, dataset.load_mask(image_id), cams.astype(np.float32),
                                     classes, dataset.num_classes)

        confusions = {t: sum_across_ranks(confusion) for t, confusion in confusions.items()}
        barrier()  # every process's CAMs are written
        cam_bytes = sum(f.stat().st_size for f in cam_dir.glob("*.npz"))
        out.metrics = curves | {"cam_bytes_per_image": round(cam_bytes / max(len(train_ids), 1))}
        if not scored:
            out.metrics |= not_scored("no masks")
        else:
            out.metrics |= iou_scores(confusions[cfg.cam.bg_threshold], dataset.classes) | {
                "scored_images": len(scored),
                "bg_threshold": cfg.cam.bg_threshold,
            } | threshold_sweep(confusions, dataset.classes) | label_free_scores(
                sum_across_ranks(histogram), ((*load_cams(cam_dir, image_id), dataset.load_mask(image_id))
                                              for image_id in shard(sorted(scored))), dataset.classes)
    return out.metrics


def label_free_scores(histogram: np.ndarray, images: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      class_names: list[str]) -> dict:
    """The CAMs' mIoU at each background threshold that needs no masks (``refine.thresholds``'
    rules: their high threshold, from every train image's CAMs), beside the configured one:
    ``<rule>_bg_threshold`` and ``<rule>_miou``; none for a rule with nothing to split.
    ``images``: each scored image's (CAMs, classes, mask), this process's share."""
    thresholds = {rule: cam_thresholds(histogram, rule) for rule in THRESHOLD_RULES}
    thresholds = {rule: pair[0] for rule, pair in thresholds.items() if pair is not None}
    num_classes = len(class_names)
    confusions = {rule: np.zeros((num_classes,) * 2, dtype=np.int64) for rule in thresholds}
    for cams, classes, mask in images:
        for rule, threshold in thresholds.items():
            confusions[rule] += confusion_matrix(mask, cam_to_label(cams, classes, threshold), num_classes)
    scores = {}
    for rule, threshold in thresholds.items():
        scores |= {f"{rule}_bg_threshold": round(threshold, 4),
                   f"{rule}_miou": iou_scores(sum_across_ranks(confusions[rule]), class_names)["miou"]}
    return scores
