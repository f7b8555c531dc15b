"""Building blocks shared by the networks (models.py) and the Self-Regulation exit heads."""
from __future__ import annotations

import torch.nn as nn


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """A 3x3 convolution (no bias: BatchNorm follows), BatchNorm and ReLU, as a list to splice
    into a Sequential."""
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]
