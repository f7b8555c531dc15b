"""Self-training: a trained segmenter's predictions on the train images, restricted to each
image's tags and (optionally) sharpened by the dense CRF, as the next round's pseudo masks.

The seg stage (stages/seg.py) trains a network on refine's pseudo masks, then, per round of
``seg.self_training``, predicts the train split with it into ``round-<r>/pseudo/`` and trains
a fresh network on those. Weak mode only: the tags are the only labels there.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.config import CrfConfig
from pipeline.core.io import load_mask, save_mask
from pipeline.core.metrics import confusion_matrix
from pipeline.core.runtime import is_main_process, shard
from pipeline.data.dataset import VOCDataset
from pipeline.data.training_set import normalize
from pipeline.methods.crf import crf_refine_scores
from pipeline.models.networks import softmax_with_flip


def tagged_probabilities(forward, image: torch.Tensor, classes: np.ndarray, flip: bool) -> np.ndarray:
    """The softmax of one 3xHxW image (averaged with its mirror's with ``flip``) over the
    background and the image's tags (1-based ``classes``) alone, renormalised over them: a train
    image cannot hold a class it is not tagged with. (1 + K, H, W), the background first."""
    probs = softmax_with_flip(forward, image, flip)
    keys = torch.as_tensor(np.concatenate([[0], classes]), dtype=torch.long, device=probs.device)
    probs = probs[keys]
    return (probs / probs.sum(dim=0, keepdim=True).clamp_min(1e-8)).cpu().numpy()


def predict_pseudo_masks(forward, dataset: VOCDataset, ids: list[str], folder: Path, flip: bool,
                         crf: CrfConfig | None, device: torch.device, scored: set[str],
                         resume: bool) -> np.ndarray:
    """Writes ``folder/<id>.png`` for this process's share of ``ids`` (a resumed round keeps
    the masks already written); returns the confusion matrix of the ``scored`` ids' masks
    against their ground truth."""
    folder.mkdir(parents=True, exist_ok=True)
    confusion = np.zeros((dataset.num_classes,) * 2, dtype=np.int64)
    for image_id in tqdm(shard(ids), desc=f"self-training masks ({folder.parent.name})", leave=False,
                         disable=not is_main_process()):
        path = folder / f"{image_id}.png"
        if resume and path.is_file():  # written atomically before a kill
            mask = load_mask(path)
        else:
            rgb, classes = dataset.load_image(image_id), dataset.image_labels(image_id)
            probs = tagged_probabilities(forward, normalize(rgb).to(device), classes, flip)
            picked = crf_refine_scores(rgb, probs, crf) if crf is not None else probs.argmax(axis=0)
            mask = np.concatenate([[0], classes]).astype(np.uint8)[picked]
            save_mask(path, mask)
        if image_id in scored:
            confusion += confusion_matrix(dataset.load_mask(image_id), mask, dataset.num_classes)
    return confusion
