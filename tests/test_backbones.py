"""Backbones: every name builds into five levels; weights by name, by file, and their errors."""
import os
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from conftest import ROOT
from PIL import Image

from pipeline.core.config import BACKBONES, BackboneConfig, TrainConfig
from pipeline.core.errors import ConfigError
from pipeline.core.training import convert_sync_batchnorm, make_optimizer
from pipeline.data.training_set import normalize
from pipeline.models.backbones import (
    LITE_NAMES,
    Backbone,
    efficientnet_lite_state_dict,
    resolve_weights,
    weights_fingerprint,
)
from pipeline.models.networks import CAMNet, DeepLab

MSRC = ROOT.parent / "shared" / "data" / "msrc-dev"


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_every_backbone_gives_five_levels_at_the_output_stride(name, output_stride):
    backbone = Backbone(BackboneConfig(name=name, output_stride=output_stride)).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == backbone.channels
    assert features[0].shape[-1] == 32 and features[1].shape[-1] == 16
    assert features[-1].shape[-1] == 64 // output_stride


def test_cam_and_segmentation_networks_take_efficientnet_lite0():
    cfg = BackboneConfig(name="efficientnet_lite0", output_stride=16)
    x = torch.randn(2, 3, 64, 64)
    assert CAMNet(cfg, 5)(x).shape == (2, 5)
    assert DeepLab(cfg, 6, [6, 12, 18])(x).shape == (2, 6, 64, 64)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_synchronised_batchnorm_computes_what_the_network_computed(name):
    """train.sync_batchnorm's conversion keeps EfficientNet's activations inside timm's
    BatchNormAct2d layers (torch's own conversion drops them); in eval mode no process group is needed."""
    torch.manual_seed(0)
    model = CAMNet(BackboneConfig(name=name), 3).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    converted = convert_sync_batchnorm(model).eval()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    assert torch.allclose(converted(x), expected)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_unet_decoder_predicts_at_stride_2_from_every_level(name):
    model = DeepLab(BackboneConfig(name=name, output_stride=16), 4, [6, 12, 18], decoder="unet").eval()
    x = torch.randn(2, 3, 64, 72)
    with torch.no_grad():
        features = model.backbone(x)
        assert model.head(features).shape == (2, 4, 32, 36)  # the stem's resolution
        assert model(x).shape == (2, 4, 64, 72)
    # The skips matter: the prediction changes when only the stem's features change.
    changed = [features[0] + 1.0] + features[1:]
    with torch.no_grad():
        assert not torch.allclose(model.head(changed), model.head(features))


@pytest.fixture
def resnet18_file(tmp_path):
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_gives_new_layers_the_head_learning_rate(kind):
    model = DeepLab(BackboneConfig(name="resnet18"), 3, [1, 2, 3])
    optimizer = make_optimizer(model, TrainConfig(optimizer=kind, lr=0.001, head_lr_mult=5.0))
    assert type(optimizer).__name__ == {"sgd": "SGD", "adam": "Adam"}[kind]
    backbone, head = optimizer.param_groups
    assert backbone["lr"] == 0.001 and head["lr"] == 0.005
    assert {id(p) for p in head["params"]} == {id(p) for p in model.new_parameters()}
    assert len(backbone["params"]) + len(head["params"]) == len(list(model.parameters()))


def test_local_state_dict_is_loaded_into_the_backbone(resnet18_file):
    model, path = resnet18_file
    backbone = Backbone(BackboneConfig(name="resnet18", weights=str(path), output_stride=32))
    assert torch.equal(backbone.body["stem"][0].weight, model.conv1.weight)
    assert torch.equal(backbone.body["layer4"][1].conv2.weight, model.layer4[1].conv2.weight)


def test_mismatched_keys_are_an_error_that_lists_them(resnet18_file, tmp_path):
    model, _ = resnet18_file
    state = model.state_dict()
    state["extra.weight"] = state.pop("layer1.0.conv1.weight")
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"cam\.backbone\.weights.*"
                                          r"missing keys \['layer1\.0\.conv1\.weight'\].*"
                                          r"unexpected keys \['extra\.weight'\]"):
        Backbone(BackboneConfig(name="resnet18", weights=str(path)), "cam.backbone")
    with pytest.raises(ConfigError, match="do not fit"):  # resnet18 weights into a resnet34
        Backbone(BackboneConfig(name="resnet34", weights=str(resnet18_file[1])))


def test_a_file_that_is_no_state_dict_is_an_error(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="junk.pth is not a loadable state_dict"):
        Backbone(BackboneConfig(name="resnet18", weights=str(path)))


def test_imagenet_weights_without_network_stop_with_how_to_give_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(*args, **kwargs):
        raise URLError("no network")

    # The one thing a test cannot do for real is to be offline on a machine that is online.
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError) as error:
        weights_fingerprint(BackboneConfig(name="resnet50", weights="imagenet"), "seg.backbone.weights")
    message = str(error.value)
    assert "could not download ImageNet weights for resnet50" in message
    assert "seg.backbone.weights: /path/to/resnet50-0676ba61.pth" in message


def test_imagenet_weights_already_in_torch_hub_cache_need_no_download(resnet18_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", None)  # must not be called
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    os.replace(resnet18_file[1], cached)
    cfg = BackboneConfig(name="resnet18", weights="imagenet")
    assert resolve_weights(cfg, "k") == cached
    assert weights_fingerprint(cfg, "k") == f"imagenet:{cached.name}"
    assert torch.equal(Backbone(cfg).body["stem"][0].weight, resnet18_file[0].conv1.weight)


@pytest.mark.parametrize("name", LITE_NAMES)
def test_efficientnet_lite_imagenet_weights_load_offline_into_every_level(name):
    cfg = BackboneConfig(name=name, weights="imagenet", output_stride=32)
    path = resolve_weights(cfg, "k")
    assert path.is_file() and weights_fingerprint(cfg, "k") == f"imagenet:{path.name}"
    state = efficientnet_lite_state_dict(name, path, "k")
    backbone = Backbone(cfg)
    assert torch.equal(backbone.body["stem"][0].weight, state["conv_stem.weight"])
    assert torch.equal(backbone.body["layer4"][1][0].conv_pwl.weight, state["blocks.6.0.conv_pwl.weight"])
    assert torch.equal(backbone.body["layer4"][2].weight, state["conv_head.weight"])


def _imagenet_classifier_on_backbone(backbone: Backbone, name: str):
    """Our Backbone's deepest level followed by the package's own ImageNet head."""
    import timm

    full = timm.create_model(name)
    full.load_state_dict(efficientnet_lite_state_dict(name, resolve_weights(
        BackboneConfig(name=name, weights="imagenet"), "k"), "k"))
    full.eval()

    def classify(x):
        return full.forward_head(backbone(x)[-1])
    return classify


@pytest.mark.skipif(not MSRC.is_dir(),
                    reason=f"real images not here ({MSRC}); a fresh clone has no ../shared")
@pytest.mark.parametrize("name", LITE_NAMES)
def test_efficientnet_lite_classifies_real_photos_sensibly(name):
    """Top-1 ImageNet class of clearly visible objects in msrc-dev, through our Backbone
    (input normalisation included), not only that the keys load."""
    cfg = BackboneConfig(name=name, weights="imagenet", output_stride=32)
    backbone = Backbone(cfg).eval()
    classify = _imagenet_classifier_on_backbone(backbone, name)
    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    expected = {"12_19_s": {"goose", "drake"}, "16_5_s": {"golden retriever", "Labrador retriever"},
                "8_22_s": {"mountain bike", "bicycle-built-for-two"}, "9_7_s": {"ram"},
                "4_6_s": {"warplane", "airliner", "wing"}, "5_3_s": {"ox"}}
    with torch.no_grad():
        for image_id, names in expected.items():
            with Image.open(MSRC / "JPEGImages" / f"{image_id}.jpg") as image:
                x = normalize(np.array(image.convert("RGB").resize((224, 224), Image.BILINEAR)))[None]
            top1 = categories[int(classify(x).argmax())]
            assert top1 in names, f"{image_id}: top-1 {top1!r}, expected one of {sorted(names)}"


def test_efficientnet_lite0_local_file_in_either_naming_loads(tmp_path):
    package_file = resolve_weights(BackboneConfig(name="efficientnet_lite0", weights="imagenet"), "k")
    timm_named = tmp_path / "lite0-timm.pth"
    torch.save(efficientnet_lite_state_dict("efficientnet_lite0", package_file, "k"), timm_named)
    for path in (package_file, timm_named):
        backbone = Backbone(BackboneConfig(name="efficientnet_lite0", weights=str(path)))
        assert torch.equal(backbone.body["stem"][0].weight, torch.load(timm_named)["conv_stem.weight"])
