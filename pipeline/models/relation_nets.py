"""The networks refine's learned walks train: PSA's AffinityNet (pixel embeddings whose
similarity is the affinity) and IRNet's boundary network (a class-agnostic boundary map).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.config import BACKBONE_LEVELS, BackboneConfig
from pipeline.models.backbones import Backbone


class AffinityNet(nn.Module):
    """Pixel embeddings for learned affinity (pipeline/affinity.py): every backbone level from
    ``feature_stride`` down is projected by a 1x1 conv, resized to that stride's map,
    concatenated and mixed by a 1x1 conv into ``embedding_channels``; shallow levels bring
    edges, deep ones semantics. ``head``: ``psa`` (PSA's resnet38_aff.py:13-22,38-41: convs
    without bias, ELU after each, kaiming init, the output conv xavier-initialised with gain 4:
    the embeddings start far apart, so the untrained affinities spread from near 0 to about
    0.5 rather than all lying near 1) or ``bn_relu`` (BN and ReLU after each projection, a
    linear output conv, default init: untrained affinities of 0.8-1.0 on random images,
    ``tests/test_affinity.py``)."""

    def __init__(self, backbone_cfg: BackboneConfig, feature_stride: int, embedding_channels: int,
                 head: str = "psa", freeze_batchnorm: bool = False, frozen_levels: tuple[str, ...] = ()):
        super().__init__()
        self.backbone = Backbone(backbone_cfg, "refine.affinity.backbone")
        self.backbone.freeze(list(frozen_levels), freeze_batchnorm)  # PSA's fixed BatchNorm and first blocks
        self.first_level = {4: 1, 8: 2}[feature_stride]  # layer1 is at stride 4, layer2 at stride 8
        widths = [64, 128, 256, 256][self.first_level - 1:]
        levels = self.backbone.channels[self.first_level:]
        if head == "psa":
            self.projections = nn.ModuleList(
                nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.ELU())
                for channels, width in zip(levels, widths))
            self.embed = nn.Sequential(nn.Conv2d(sum(widths), embedding_channels, 1, bias=False), nn.ELU())
            for projection in self.projections:
                nn.init.kaiming_normal_(projection[0].weight)
            nn.init.xavier_uniform_(self.embed[0].weight, gain=4)
        else:
            self.projections = nn.ModuleList(
                nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width),
                              nn.ReLU(inplace=True))
                for channels, width in zip(levels, widths))
            self.embed = nn.Conv2d(sum(widths), embedding_channels, 1)

    def new_parameters(self) -> list[nn.Parameter]:
        return [p for head in (self.projections, self.embed) for p in head.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x embedding_channels x h x w, h x w the size of the feature-stride level."""
        features = self.backbone(x)[self.first_level:]
        size = features[0].shape[-2:]
        projected = [F.interpolate(project(f), size=size, mode="bilinear", align_corners=False)
                     if f.shape[-2:] != size else project(f)
                     for project, f in zip(self.projections, features)]
        return self.embed(torch.cat(projected, dim=1))


class BoundaryNet(nn.Module):
    """IRNet's boundary branch (irn@a2ece00 net/resnet50_irn.py:23-51,117-122): each of the five
    backbone levels through a 1x1 conv to 32 channels and GroupNorm(4), resized to the stride-4
    map, ReLU; the 160 channels concatenated and a 1x1 conv (with bias) to one boundary logit
    per pixel. IRNet freezes the backbone (features detached, BatchNorm in eval mode);
    ``freeze_backbone=False`` trains it too."""

    def __init__(self, backbone_cfg: BackboneConfig, freeze_backbone: bool = True):
        super().__init__()
        self.backbone = Backbone(backbone_cfg, "refine.irn.backbone")
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.freeze(list(BACKBONE_LEVELS), batchnorm=True)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, 32, 1, bias=False), nn.GroupNorm(4, 32))
            for channels in self.backbone.channels)
        self.boundary = nn.Conv2d(32 * len(self.backbone.channels), 1, 1)

    def new_parameters(self) -> list[nn.Parameter]:
        return [p for head in (self.branches, self.boundary) for p in head.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 1 x h x w boundary logits, h x w the size of the stride-4 level (layer1)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            features = self.backbone(x)
        size = features[1].shape[-2:]
        maps = [F.relu(F.interpolate(branch(f), size=size, mode="bilinear", align_corners=False)
                       if f.shape[-2:] != size else branch(f))
                for branch, f in zip(self.branches, features)]
        return self.boundary(torch.cat(maps, dim=1))
