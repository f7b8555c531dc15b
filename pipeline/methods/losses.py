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
