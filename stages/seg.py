"""Stage seg: train a DeepLab segmenter on pixel labels, predict and score the val split.

The pixel labels are the refine stage's pseudo masks in weak mode (255 = unsure,
ignored by the loss) and the ground-truth masks in full mode (the upper bound).
Outputs in ``<run-dir>/seg/``: ``model.pt``, ``predictions/<id>.png`` and ``metrics.json``.
With ``seg.sr.enabled`` the segmenter trains with Self-Regulation exits
(pipeline/self_regulation.py); prediction runs the main path alone.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.backbones import weights_fingerprint
from pipeline.cache import StageOutput, upstream_keys
from pipeline.config import Config, SRConfig, section_for_cache
from pipeline.data import MaskFolder, TrainingSet, normalize, open_dataset
from pipeline.io import save_mask
from pipeline.losses import pixel_cross_entropy
from pipeline.metrics import confusion_matrix, iou_scores
from pipeline.models import DeepLab
from pipeline.runtime import is_main_process, seed_everything, select_device, shard
from pipeline.self_regulation import self_regulation_loss
from pipeline.train import LossFn, make_train_loader, save_checkpoint, train

NAME = "seg"


def upstream(cfg: Config) -> list[str]:
    return ["refine"] if cfg.mode == "weak" else []


def own_inputs(cfg: Config) -> dict:
    dataset = open_dataset(cfg.data)
    return {"config": section_for_cache(cfg, "seed", "mode", "data", "seg"),
            "data_fingerprint": dataset.fingerprint(cfg.data.train_split, [cfg.data.val_split]),
            "weights_fingerprint": weights_fingerprint(cfg.seg.backbone, "seg.backbone.weights")}


def segmentation_loss(model, batch, epoch) -> dict:
    return {"loss": pixel_cross_entropy(model(batch["image"]), batch["mask"])}


def sr_segmentation_loss(model, batch, epoch, sr: SRConfig) -> dict:
    """Self-Regulation with the pixel labels; the image labels are the data set's (the tags in weak mode)."""
    return self_regulation_loss(model.forward_exits(batch["image"]), batch["labels"], sr, epoch, mask=batch["mask"])


def training_loss(sr: SRConfig) -> LossFn:
    """The baseline loss, or the Self-Regulation loss when ``sr.enabled``."""
    return functools.partial(sr_segmentation_loss, sr=sr) if sr.enabled else segmentation_loss


@torch.no_grad()
def predict(model: DeepLab, image: torch.Tensor, flip: bool) -> np.ndarray:
    """Class-index mask for one 3xHxW image, averaging softmax with the mirrored image's."""
    batch = torch.stack([image, image.flip(-1)]) if flip else image[None]
    probs = model(batch).softmax(dim=1)
    if flip:
        probs = probs[0:1] + probs[1:2].flip(-1)
    return probs[0].argmax(dim=0).to(torch.uint8).cpu().numpy()


def run(cfg: Config, run_dir: Path) -> dict:
    dataset = open_dataset(cfg.data)
    device = select_device(cfg.device)
    generator = seed_everything(cfg.seed)
    inputs = own_inputs(cfg) | {"upstream": upstream_keys(run_dir, upstream(cfg))}
    pixel_labels = MaskFolder(run_dir / "refine" / "pseudo") if cfg.mode == "weak" else dataset.load_train_mask
    with StageOutput(run_dir, NAME, inputs) as out:
        model = DeepLab(cfg.seg.backbone, dataset.num_classes, cfg.seg.aspp_rates, cfg.seg.sr).to(device)
        train_set = TrainingSet(dataset, dataset.split_ids(cfg.data.train_split), cfg.seg.train.crop_size,
                                cfg.seg.train.scale_range, pixel_labels=pixel_labels)
        loader = make_train_loader(train_set, cfg.seg.train, cfg.data.loader_workers, generator)
        losses = train(model, loader, training_loss(cfg.seg.sr), cfg.seg.train, device, f"seg ({cfg.mode})")
        save_checkpoint(out.dir / "model.pt", model)

        prediction_dir = out.dir / "predictions"
        prediction_dir.mkdir()
        confusion = 0
        for image_id in tqdm(shard(dataset.split_ids(cfg.data.val_split)), desc="seg prediction", leave=False,
                             disable=not is_main_process()):
            mask = predict(model, normalize(dataset.load_image(image_id)).to(device), cfg.seg.flip_predict)
            save_mask(prediction_dir / f"{image_id}.png", mask)
            confusion = confusion + confusion_matrix(dataset.load_mask(image_id), mask, dataset.num_classes)
        out.metrics = iou_scores(confusion, dataset.classes) | {
            "mode": cfg.mode,
            "train_loss_by_epoch": [round(v, 4) for v in losses],
        }
    return out.metrics
