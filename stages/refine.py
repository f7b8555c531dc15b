"""Stage refine: CAMs -> pseudo masks with a background score, a dense CRF and two thresholds.

As in IRNet, each image's CAMs are labelled twice, once against a high background
score (``fg_threshold``: what survives is confidently foreground) and once against a
low one (``bg_threshold``: what is still background is confidently background); a CRF
snaps both label maps to image edges. Pixels that neither confirms are unsure (255).
Outputs in ``<run-dir>/refine/``: ``pseudo/<id>.png`` (uint8 palette PNG: 0 background,
1..C-1 classes, 255 unsure) and ``metrics.json``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.cache import StageOutput, upstream_keys
from pipeline.cam import cam_argmax
from pipeline.config import Config, DataConfig, RefineConfig, section_for_cache
from pipeline.crf import crf_refine_labels
from pipeline.data import IGNORE, open_dataset, score_ids, score_split
from pipeline.io import save_mask
from pipeline.metrics import confident_confusion_matrix, confusion_matrix, iou_scores
from pipeline.runtime import is_main_process, parallel_map, shard
from stages.cam import load_cams

NAME = "refine"


def upstream(cfg: Config) -> list[str]:
    return ["cam"]


def own_inputs(cfg: Config) -> dict:
    dataset = open_dataset(cfg.data)
    return {"config": section_for_cache(cfg, "data", "refine"),
            "data_fingerprint": dataset.fingerprint(cfg.data.train_split, [score_split(cfg.data)])}


def pseudo_mask(image: np.ndarray, cams: np.ndarray, classes: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    """uint8 mask: 0 confident background, class index where confidently foreground, 255 unsure."""
    if len(classes) == 0:
        # The image label says there is no object: every pixel is background.
        return np.zeros(image.shape[:2], dtype=np.uint8)
    num_labels = len(classes) + 1
    keys = np.concatenate([[0], classes]).astype(np.uint8)
    confident_fg = crf_refine_labels(image, cam_argmax(cams, cfg.fg_threshold), num_labels, cfg.crf)
    confident_bg = crf_refine_labels(image, cam_argmax(cams, cfg.bg_threshold), num_labels, cfg.crf)
    mask = keys[confident_fg]
    mask[confident_fg == 0] = IGNORE
    mask[(confident_fg == 0) & (confident_bg == 0)] = 0
    return mask


def _refine_one(image_id: str, data: DataConfig, scored: set[str], cam_dir: Path, out_dir: Path,
                cfg: RefineConfig):
    """Worker task: writes one pseudo mask; returns its confusion matrices (zero when the id
    is not scored) and its unsure pixel count."""
    dataset = open_dataset(data)
    cams, classes = load_cams(cam_dir, image_id)
    mask = pseudo_mask(dataset.load_image(image_id), cams, classes, cfg)
    save_mask(out_dir / f"{image_id}.png", mask)
    if image_id not in scored:
        return 0, 0, int((mask == IGNORE).sum()), mask.size
    gt = dataset.load_mask(image_id)
    as_background = np.where(mask == IGNORE, 0, mask).astype(np.uint8)
    return (confusion_matrix(gt, as_background, dataset.num_classes),
            confident_confusion_matrix(gt, mask, dataset.num_classes),
            int((mask == IGNORE).sum()), mask.size)


def run(cfg: Config, run_dir: Path) -> dict:
    dataset = open_dataset(cfg.data)
    train_ids = shard(dataset.split_ids(cfg.data.train_split))
    inputs = own_inputs(cfg) | {"upstream": upstream_keys(run_dir, upstream(cfg))}
    with StageOutput(run_dir, NAME, inputs) as out:
        pseudo_dir = out.dir / "pseudo"
        pseudo_dir.mkdir()
        task = functools.partial(_refine_one, data=cfg.data, scored=score_ids(cfg.data, dataset),
                                 cam_dir=run_dir / "cam" / "cams", out_dir=pseudo_dir, cfg=cfg.refine)
        confusion = confident = 0
        unsure = total = 0
        with parallel_map(task, train_ids, cfg.refine.workers) as results:
            for cm, cm_sure, n_unsure, n_pixels in tqdm(results, total=len(train_ids), desc="refine (CRF)",
                                                        leave=False, disable=not is_main_process()):
                confusion, confident = confusion + cm, confident + cm_sure
                unsure, total = unsure + n_unsure, total + n_pixels
        confident_scores = iou_scores(confident, dataset.classes)
        out.metrics = iou_scores(confusion, dataset.classes) | {
            "unsure_fraction": round(unsure / max(total, 1), 4),
            "confident_miou": confident_scores["miou"],
            "confident_per_class_iou": confident_scores["per_class_iou"],
            "fg_threshold": cfg.refine.fg_threshold,
            "bg_threshold": cfg.refine.bg_threshold,
        }
    return out.metrics
