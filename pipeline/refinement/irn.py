"""``refine.method: irn``: IRNet's boundary map and random walk (Ahn, Cho & Kwak, CVPR 2019).

The confident pixels of refine's CRF masks teach a class-agnostic boundary map; the CAMs
walk along the path affinities it gives (the largest boundary on the line between two
pixels), and each pixel takes the class of the highest walked score against IRNet's
constant background score ``irn_walk.bg_threshold``.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.config import IrnWalkConfig
from pipeline.methods.affinity import (
    boundary_loss,
    normalized_transitions,
    path_affinities,
    random_walk,
    walk_offsets,
)
from pipeline.models.relation_nets import BoundaryNet
from pipeline.refinement.learned_walk import LearnedWalk
from pipeline.refinement.masks import MaskMaker


class IrnWalk(LearnedWalk):
    name = "irn"
    sections = ("irn", "irn_walk")
    network_folder = "irn"

    def build_network(self) -> BoundaryNet:
        return BoundaryNet(self.cfg.refine.irn.backbone, self.cfg.refine.irn.freeze_backbone)

    def training_loss(self):
        net = self.cfg.refine.irn
        return functools.partial(_boundary_training_loss, radius=net.radius,
                                 label_downsample=net.label_downsample)

    def network_batch(self, image: torch.Tensor) -> torch.Tensor:
        """What the walk feeds the network: the image and its mirror (the boundary map averages both)."""
        return torch.stack([image, image.flip(-1)])

    def walked_scores(self, model: BoundaryNet, image: torch.Tensor, cams: np.ndarray) -> np.ndarray:
        return boundary_scores(model, image, cams, self.cfg.refine.irn_walk)

    def mask_from_scores(self) -> MaskMaker:
        return argmax_mask

    def metrics(self) -> dict:
        return {"rule": "argmax"}


def _boundary_training_loss(model, batch, epoch, radius: int, label_downsample: str) -> dict:
    return boundary_loss(torch.sigmoid(model(batch["image"])), batch["mask"], radius, label_downsample)


@torch.no_grad()
def boundary_scores(model: BoundaryNet, image: torch.Tensor, cams: np.ndarray,
                    cfg: IrnWalkConfig) -> np.ndarray:
    """IRNet's walk on one 3 x H x W image (make_sem_seg_labels.py:37-49, misc/indexing.py:141-167):
    the boundary map (the mean of the image's and its mirror's logits, then a sigmoid), the CAMs
    pooled to it and multiplied by (1 - boundary), walked along the path affinities, upsampled,
    divided by their overall maximum; returned after the constant background map
    ``bg_threshold``, the K CAMs following, at the image's size."""
    logits = model(torch.stack([image, image.flip(-1)]))
    boundary = torch.sigmoid((logits[0] + logits[1].flip(-1)) / 2)[None]
    maps = F.adaptive_avg_pool2d(torch.from_numpy(cams).to(image.device, torch.float32)[None],
                                 boundary.shape[-2:])
    offsets = walk_offsets(cfg.radius)
    weights = normalized_transitions(path_affinities(boundary, offsets), offsets, cfg.beta, cfg.radius, "all")
    maps = random_walk(maps * (1 - boundary), weights, offsets, cfg.iterations)
    maps = F.interpolate(maps, size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
    maps = maps / maps.max().clamp_min(1e-5)
    return torch.cat([torch.full_like(maps[:1], cfg.bg_threshold), maps]).cpu().numpy()


def argmax_mask(image: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """uint8 pseudo mask: the class (or background, row 0) of the highest walked score."""
    labels = np.concatenate([scores[:1], scores[-len(classes):]]).argmax(axis=0)
    return np.concatenate([[0], classes]).astype(np.uint8)[labels]
