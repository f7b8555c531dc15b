"""Networks: the CAM classifier, the DeepLab segmenter and AffinityNet on a five-level backbone.

The backbone (pipeline/backbones.py) returns the features of all five levels (stem, layer1..layer4) so that
Self-Regulation heads can attach to any of them; the CAM and segmentation networks
themselves only use the deepest level; AffinityNet combines the levels from its
feature stride down. With ``sr.enabled`` a network also holds the
training-only ``sr_heads`` and offers ``forward_exits``; its inference methods
(``CAMNet.cams``, ``DeepLab.forward``) never call them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.segmentation.deeplabv3 import ASPP

from pipeline.core.config import BACKBONE_LEVELS, BackboneConfig, Config, CrfConfig, SRConfig
from pipeline.methods.crf import crf_refine_scores
from pipeline.methods.mixed import EMANetwork
from pipeline.methods.self_regulation import Exit, SRHeads
from pipeline.models.backbones import Backbone
from pipeline.models.layers import conv_bn_relu


class CAMNet(nn.Module):
    """Multi-label classifier whose 1x1 classifier weights give Class Activation Maps."""

    def __init__(self, backbone_cfg: BackboneConfig, num_foreground: int, sr: SRConfig | None = None,
                 recam: bool = False):
        super().__init__()
        self.backbone = Backbone(backbone_cfg, "cam.backbone")
        # No bias: a CAM is then exactly the classifier applied at every location.
        self.classifier = nn.Conv2d(self.backbone.channels[-1], num_foreground, 1, bias=False)
        self.sr_heads = (SRHeads(sr, self.backbone.channels, num_foreground, num_foreground,
                                 main_classifier=False)
                         if sr is not None and sr.enabled else None)
        self.recam = None
        if recam:
            self.attach_recam()

    def attach_recam(self) -> None:
        """ReCAM's second classifier (cam.recam): trained after the network (attached then, so
        that the network trains exactly as without it), it rescales the CAM classifier's
        weights, class by class and channel by channel, in ``cams``."""
        self.recam = nn.Conv2d(self.classifier.in_channels, self.classifier.out_channels, 1, bias=False)

    def new_parameters(self) -> list[nn.Parameter]:
        return [p for head in (self.classifier, self.sr_heads) if head is not None for p in head.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image-level logits, one per foreground class."""
        features = self.backbone(x)[-1]
        return self.classifier(F.adaptive_avg_pool2d(features, 1)).flatten(1)

    def cam_weight(self) -> torch.Tensor:
        """The 1x1 weights that make the CAMs: the classifier's, or with ReCAM's classifier the
        product of both (ReCAM's make_recam.py:39)."""
        return self.classifier.weight if self.recam is None else self.recam.weight * self.classifier.weight

    def cams(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU of ``cam_weight`` applied to the last feature map: (B, C-1, h, w)."""
        return F.relu(F.conv2d(self.backbone(x)[-1], self.cam_weight()))

    def forward_recam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ReCAM's training pass: the image-level logits (B, C-1) and ReCAM's classifier's logits
        (B, C-1, C-1) for each class's feature: the mean of the features weighted by the class's
        ReLU'd CAM over its maximum (ReCAM's Net_CAM_Feature and Class_Predictor,
        net/resnet50_cam.py:81-100,147-159)."""
        features = self.backbone(x)[-1]
        logits = self.classifier(F.adaptive_avg_pool2d(features, 1)).flatten(1)
        cams = F.relu(self.classifier(features)).flatten(2)
        cams = cams / (cams.max(dim=2, keepdim=True).values + 1e-5)
        class_features = torch.einsum("bcn,bdn->bcd", cams, features.flatten(2)) / cams.shape[-1]
        return logits, F.linear(class_features, self.recam.weight.flatten(1))

    def forward_exits(self, x: torch.Tensor, with_features: bool = False):
        """Training with SR: every exit's (maps, logits), shallow -> deep; the main exit's maps
        are the CAMs before the ReLU and its logits those of ``forward``. ``with_features``: also
        the backbone's feature maps at the exits' levels and the last one, shallow -> deep
        (``sr.detail_target: energy``)."""
        features = self.backbone(x)
        exits = self.sr_heads(features, self.classifier(features[-1]))
        if not with_features:
            return exits
        levels = [BACKBONE_LEVELS.index(level) for level in self.sr_heads.exits]
        return exits, [features[index] for index in levels] + [features[-1]]


class DeepLab(nn.Module):
    """DeepLab-v3-style segmenter: dilated backbone + a head, logits at input size. The head
    is DeepLab-v3's ASPP head on the deepest level (``decoder: aspp``) or a decoder with skips
    from every level (``decoder: unet``), which predicts at stride 2 for thin structures.

    With ``teacher_head`` (--mode mixed, pipeline/mixed.py) a second head of the same
    structure, with its own weights, shares the backbone: the teacher branch; ``head`` is the
    student, the branch ``forward`` predicts with."""

    def __init__(self, backbone_cfg: BackboneConfig, num_classes: int, aspp_rates: list[int],
                 sr: SRConfig | None = None, teacher_head: bool = False, decoder: str = "aspp"):
        super().__init__()
        self.backbone = Backbone(backbone_cfg, "seg.backbone")
        channels = self.backbone.channels
        self.head = segmentation_head(decoder, channels, num_classes, aspp_rates)
        self.teacher_head = (segmentation_head(decoder, channels, num_classes, aspp_rates)
                             if teacher_head else None)
        self.sr_heads = (SRHeads(sr, channels, num_classes, num_classes - 1, main_classifier=True)
                         if sr is not None and sr.enabled else None)

    def new_parameters(self) -> list[nn.Parameter]:
        return [p for head in (self.head, self.teacher_head, self.sr_heads) if head is not None
                for p in head.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._at_input_size(self.head(self.backbone(x)), x)

    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self._at_input_size(self.teacher_head(self.backbone(x)), x)

    def forward_exits(self, x: torch.Tensor) -> list[Exit]:
        """Training with SR: every exit's (maps, logits), shallow -> deep; the main exit's maps
        are the head's logits at the head's own resolution."""
        features = self.backbone(x)
        return self.sr_heads(features, self.head(features))

    def forward_branches(self, x: torch.Tensor, with_exits: bool) -> dict:
        """Mixed-mode training, one backbone pass: the student's and the teacher's logits at
        input size and, ``with_exits``, the SR exits with the student as the main exit."""
        features = self.backbone(x)
        student = self.head(features)
        return {"student": self._at_input_size(student, x),
                "teacher": self._at_input_size(self.teacher_head(features), x),
                "exits": self.sr_heads(features, student) if with_exits else None}

    @staticmethod
    def _at_input_size(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def segmentation_head(decoder: str, channels: list[int], num_classes: int,
                      aspp_rates: list[int]) -> nn.Module:
    if decoder == "aspp":
        return ASPPHead(channels[-1], num_classes, aspp_rates)
    return UNetDecoder(channels, num_classes)


class ASPPHead(nn.Sequential):
    """DeepLab-v3's head on the deepest level: ASPP, a 3x3 conv-BN-ReLU, a 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, aspp_rates: list[int]):
        super().__init__(ASPP(in_channels, aspp_rates, out_channels=256), *conv_bn_relu(256, 256),
                         nn.Conv2d(256, num_classes, 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return super().forward(features[-1])


class UNetDecoder(nn.Module):
    """A decoder with skips, as in U-Net: from the deepest level up, the running map is resized
    to the next shallower level, concatenated with it and mixed by two 3x3 conv-BN-ReLU, down to
    the stem's stride 2; then a 1x1 classifier. Widths halve per level from 256."""

    WIDTHS = (256, 128, 64, 32)  # after layer3, layer2, layer1, stem

    def __init__(self, channels: list[int], num_classes: int):
        super().__init__()
        blocks, running = [], channels[-1]
        for skip, width in zip(reversed(channels[:-1]), self.WIDTHS):
            blocks.append(nn.Sequential(*conv_bn_relu(running + skip, width), *conv_bn_relu(width, width)))
            running = width
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Conv2d(running, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.classifier(x)


@torch.no_grad()
def softmax_with_flip(forward, image: torch.Tensor, flip: bool) -> torch.Tensor:
    """The (C, H, W) float32 softmax of one 3xHxW image, averaged with its mirror's with ``flip``."""
    batch = torch.stack([image, image.flip(-1)]) if flip else image[None]
    probs = forward(batch).float().softmax(dim=1)
    return (probs[0] + probs[1].flip(-1)) / 2 if flip else probs[0]


def predict_with_crf(forward, image: torch.Tensor, rgb: np.ndarray, flip: bool, crf: CrfConfig) -> np.ndarray:
    """The class-index mask of one 3xHxW image: its softmax (averaged with its mirror's with
    ``flip``) as the dense CRF's unaries on the HxWx3 uint8 ``rgb``, the argmax of the marginals."""
    probs = softmax_with_flip(forward, image, flip)
    return crf_refine_scores(rgb, probs.cpu().numpy(), crf).astype(np.uint8)


@torch.no_grad()
def predict_batch(forward, images: list[torch.Tensor], flip: bool) -> list[np.ndarray]:
    """Class-index masks of same-sized 3xHxW images from a logits function (a branch of the
    model), in one pass; with ``flip`` each softmax is averaged with its mirrored image's."""
    batch = torch.stack(images)
    if flip:
        batch = torch.cat([batch, batch.flip(-1)])
    probs = forward(batch).softmax(dim=1)
    if flip:
        probs = probs[:len(images)] + probs[len(images):].flip(-1)
    classes = probs.max(dim=1).indices  # argmax's indices, faster on the CPU (self_regulation.py)
    return list(classes.to(torch.uint8).cpu().numpy())


def segmentation_network(cfg: Config, num_classes: int, training: bool) -> DeepLab:
    """The network ``cfg`` describes: with a teacher head in mixed mode, and only for ``training``
    the SR exit heads and copy-paste's EMA copy (``model.pt`` leaves them out, so a saved model
    loads without)."""
    model = DeepLab(cfg.seg.backbone, num_classes, cfg.seg.aspp_rates, cfg.seg.sr if training else None,
                    teacher_head=cfg.mode == "mixed", decoder=cfg.seg.decoder)
    if training and cfg.mode == "mixed" and cfg.mixed.copy_paste.enabled:
        model.ema = EMANetwork(model)
    return model
