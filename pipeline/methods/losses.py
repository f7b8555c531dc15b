"""Loss functions of the CAM and segmentation networks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.dataset import IGNORE


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the foreground classes (IRNet's soft-margin loss)."""
    return F.binary_cross_entropy_with_logits(logits, labels)


def pixel_cross_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over labelled pixels; 0 (with a gradient path) when none is labelled,
    so a batch of all-unsure pseudo masks cannot turn the loss into NaN."""
    if not (mask != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, mask, ignore_index=IGNORE)


def recam_loss(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ReCAM's softmax cross-entropy (net/resnet50_cam.py:153-173): each class of an image has
    its feature's logits over all classes (B, C, C), the class itself the target; the mean over
    an image's classes, summed over the images, over the batch size."""
    batch, classes = labels.nonzero(as_tuple=True)
    if len(batch) == 0:  # no class in any image: nothing to separate
        return class_logits.sum() * 0.0
    per_class = F.cross_entropy(class_logits[batch, classes], classes, reduction="none")
    per_image = torch.zeros(labels.shape[0], device=labels.device, dtype=per_class.dtype)
    per_image = per_image.index_add(0, batch, per_class) / labels.sum(dim=1).clamp_min(1)
    return per_image.sum() / labels.shape[0]
