"""Networks: a multi-level ResNet backbone, the CAM classifier and the DeepLab segmenter.

The backbone returns the features of all five levels (stem, layer1..layer4) so that
Self-Regulation heads can attach to any of them; the CAM and segmentation networks
themselves only use the deepest level. With ``sr.enabled`` a network also holds the
training-only ``sr_heads`` and offers ``forward_exits``; its inference methods
(``CAMNet.cams``, ``DeepLab.forward``) never call them.
"""
from __future__ import annotations

from pathlib import Path
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.segmentation.deeplabv3 import ASPP

from pipeline.config import BACKBONE_LEVELS, BackboneConfig, SRConfig
from pipeline.errors import ConfigError
from pipeline.self_regulation import Exit, SRHeads


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Turns a strided ResNet stage into a dilated one (same receptive field, no downsampling).

    torchvision's ``replace_stride_with_dilation`` only exists for Bottleneck ResNets;
    this works on BasicBlock (resnet18/34) as well.
    """
    for module in layer.modules():
        if isinstance(module, nn.Conv2d):
            if module.stride == (2, 2):
                module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (dilation, dilation)
                module.padding = (dilation, dilation)


def _load_weights(model: nn.Module, path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"backbone weights file {file} does not exist (config key backbone.weights)")
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = {k for k in model.state_dict() if not k.startswith("fc.")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(f"backbone weights {file} do not match {type(model).__name__}: "
                          f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    model.load_state_dict(state, strict=False)


class Backbone(nn.Module):
    """A torchvision ResNet cut into five levels, with dilation for output stride 8 or 16."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        resnet = getattr(torchvision.models, cfg.name)(weights=None)
        if cfg.weights:
            _load_weights(resnet, cfg.weights)
        if cfg.output_stride <= 16:
            _dilate(resnet.layer4, 2 if cfg.output_stride == 16 else 4)
        if cfg.output_stride == 8:
            _dilate(resnet.layer3, 2)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu)
        self.layer1 = nn.Sequential(resnet.maxpool, resnet.layer1)
        self.layer2, self.layer3, self.layer4 = resnet.layer2, resnet.layer3, resnet.layer4
        expansion = 4 if cfg.name in ("resnet50", "resnet101") else 1
        self.channels = [64] + [c * expansion for c in (64, 128, 256, 512)]
        self.output_stride = cfg.output_stride

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for level in BACKBONE_LEVELS:
            x = getattr(self, level)(x)
            features.append(x)
        return features


class CAMNet(nn.Module):
    """Multi-label classifier whose 1x1 classifier weights give Class Activation Maps."""

    def __init__(self, backbone_cfg: BackboneConfig, num_foreground: int, sr: SRConfig | None = None):
        super().__init__()
        self.backbone = Backbone(backbone_cfg)
        # No bias: a CAM is then exactly the classifier applied at every location.
        self.classifier = nn.Conv2d(self.backbone.channels[-1], num_foreground, 1, bias=False)
        self.sr_heads = (SRHeads(sr, self.backbone.channels, num_foreground, num_foreground, main_classifier=False)
                         if sr is not None and sr.enabled else None)

    def new_parameters(self) -> list[nn.Parameter]:
        return [p for head in (self.classifier, self.sr_heads) if head is not None for p in head.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image-level logits, one per foreground class."""
        features = self.backbone(x)[-1]
        return self.classifier(F.adaptive_avg_pool2d(features, 1)).flatten(1)

    def cams(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU of the classifier applied to the last feature map: (B, C-1, h, w)."""
        return F.relu(self.classifier(self.backbone(x)[-1]))

    def forward_exits(self, x: torch.Tensor) -> list[Exit]:
        """Training with SR: every exit's (maps, logits), shallow -> deep; the main exit's maps
        are the CAMs before the ReLU and its logits those of ``forward``."""
        features = self.backbone(x)
        return self.sr_heads(features, self.classifier(features[-1]))


class DeepLab(nn.Module):
    """DeepLab-v3-style segmenter: dilated ResNet + ASPP head, logits at input size."""

    def __init__(self, backbone_cfg: BackboneConfig, num_classes: int, aspp_rates: list[int],
                 sr: SRConfig | None = None):
        super().__init__()
        self.backbone = Backbone(backbone_cfg)
        self.head = nn.Sequential(
            ASPP(self.backbone.channels[-1], aspp_rates, out_channels=256),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1),
        )
        self.sr_heads = (SRHeads(sr, self.backbone.channels, num_classes, num_classes - 1, main_classifier=True)
                         if sr is not None and sr.enabled else None)

    def new_parameters(self) -> list[nn.Parameter]:
        return [p for head in (self.head, self.sr_heads) if head is not None for p in head.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x)[-1])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_exits(self, x: torch.Tensor) -> list[Exit]:
        """Training with SR: every exit's (maps, logits), shallow -> deep; the main exit's maps
        are the head's logits at the backbone's output stride."""
        features = self.backbone(x)
        return self.sr_heads(features, self.head(features[-1]))

