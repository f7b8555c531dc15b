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


def soft_dice_loss(logits: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - the mean soft Dice of the foreground classes (softmax against the one-hot mask, each
    class's overlap summed over the whole batch, unlabelled pixels left out), as nnU-Net's
    batch Dice (do_bg False); 0 (with a gradient path) when no pixel is labelled."""
    labelled = mask != IGNORE
    if not labelled.any():
        return logits.sum() * 0.0
    probs = F.softmax(logits, dim=1)[:, 1:] * labelled[:, None]
    # unlabelled pixels count as background, which the foreground classes leave out
    target = F.one_hot(torch.where(labelled, mask, 0), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:]
    target = target.to(probs.dtype)
    dims = (0, 2, 3)
    overlap = (probs * target).sum(dims)
    dice = (2 * overlap + smooth) / (probs.sum(dims) + target.sum(dims) + smooth)
    return 1 - dice.mean()


def mask_loss(logits: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """``seg.loss`` on a pixel mask: the cross-entropy, plus the soft Dice with ``cross_entropy_dice``."""
    loss = pixel_cross_entropy(logits, mask)
    return loss + soft_dice_loss(logits, mask) if kind == "cross_entropy_dice" else loss


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
