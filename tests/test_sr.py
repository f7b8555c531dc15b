"""Self-Regulation: config, the loss terms on hand-made tensors, the networks' exits,
the inference checkpoint, the warm-up wiring of the training loop, and a tiny end-to-end run."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO_CONFIG

from pipeline.core.config import BACKBONE_LEVELS, BackboneConfig, SRConfig
from pipeline.core.config_file import config_from_dict, load_config
from pipeline.core.errors import ConfigError
from pipeline.core.training import load_checkpoint, save_checkpoint, train
from pipeline.methods.losses import multilabel_loss, pixel_cross_entropy
from pipeline.methods.self_regulation import (
    cam_exit_mask_loss,
    class_detail_loss,
    context_loss,
    energy_detail_loss,
    self_regulation_loss,
    softened_kl,
    spatial_detail_loss,
)
from pipeline.models.networks import CAMNet, DeepLab
from stages import cam as cam_stage
from stages import seg as seg_stage

BACKBONE = BackboneConfig(name="resnet18", output_stride=16)
SR = SRConfig(enabled=True)


def camnet(sr=None):
    torch.manual_seed(0)
    return CAMNet(BACKBONE, 3, sr)


def deeplab(sr=None):
    torch.manual_seed(0)
    return DeepLab(BACKBONE, 4, [6, 12, 18], sr)


def batch(size=32, num_fg=3):
    generator = torch.Generator().manual_seed(1)
    return {"image": torch.randn(2, 3, size, size, generator=generator),
            "labels": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])[:, :num_fg],
            "mask": torch.randint(0, num_fg + 1, (2, size, size), generator=generator)}


def hand_made_exits(channels=4, sizes=(16, 8, 4, 4), requires_grad=True):
    """Exits at different resolutions, shallow -> deep, as leaf tensors."""
    generator = torch.Generator().manual_seed(2)
    return [(torch.randn(2, channels, s, s, generator=generator).requires_grad_(requires_grad),
             torch.randn(2, 3, generator=generator).requires_grad_(requires_grad)) for s in sizes]


# --- config ---------------------------------------------------------------------------------

def test_sr_config_defaults_and_keys():
    # The authors' (SR-SS deeplab.py, trainval.py): exits on stem..layer3, the main head the
    # deepest; 256-wide heads; 0.2 / 0.8 / 1 / 1; II and III summed over the students, II at the input size.
    sr = SRConfig()
    assert not sr.enabled and sr.exits == list(BACKBONE_LEVELS[:-1])
    assert (sr.w_cls, sr.w_seg, sr.w_sf, sr.w_sl) == (0.2, 0.8, 1.0, 1.0)
    assert (sr.head_channels, sr.reduction, sr.detail_resolution) == (256, "sum", "input")
    assert sr.w_main_cls is None  # the main exit weighted like the others
    cfg = load_config(DEMO_CONFIG, ["cam.sr.enabled=true", "seg.sr.form=soft", "seg.sr.exits=[layer1, stem]"])
    assert cfg.cam.sr.enabled and cfg.cam.sr.exits == list(BACKBONE_LEVELS[:-1])
    assert cfg.cam.sr.head_channels == 256
    assert cfg.seg.sr.form == "soft" and cfg.seg.sr.exits == ["layer1", "stem"]
    # The demo ships SR in seg alone, at the width and reduction chosen on train (docs/results.md).
    shipped = load_config(DEMO_CONFIG, [])
    assert not shipped.cam.sr.enabled and shipped.seg.sr.enabled
    assert (shipped.seg.sr.head_channels, shipped.seg.sr.reduction) == (32, "mean")


@pytest.mark.parametrize("raw, match", [
    ({"cam": {"sr": {"exits": ["layer5"]}}}, "'cam.sr.exits' lists 'layer5'"),
    ({"seg": {"sr": {"exits": ["stem", "stem"]}}}, "'seg.sr.exits' lists a level twice"),
    ({"seg": {"sr": {"enabled": True, "exits": []}}}, "'seg.sr.exits' must list at least one"),
    ({"cam": {"sr": {"form": "medium"}}}, "'cam.sr.form' must be one of hard, soft"),
    ({"cam": {"sr": {"temperature": 0}}}, "'cam.sr.temperature' must be >="),
    ({"seg": {"sr": {"w_sf": -1}}}, "'seg.sr.w_sf' must be >="),
    ({"cam": {"sr": {"w_main_cls": -0.5}}}, "'cam.sr.w_main_cls' must be >="),
])
def test_sr_config_errors_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


# --- the loss terms on hand-made tensors --------------------------------------------------

def test_soft_kl_is_zero_for_a_student_equal_to_the_teacher_and_positive_otherwise():
    teacher = torch.randn(2, 5, 3, 3)
    assert softened_kl(teacher, [teacher.clone()], 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert softened_kl(teacher, [teacher + torch.randn(2, 5, 3, 3)], 2.0).item() > 1e-3
    assert class_detail_loss(teacher, [teacher.clone()], "soft", 4.0).item() == pytest.approx(0.0, abs=1e-6)
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    loss = spatial_detail_loss(teacher, [teacher.clone()], labels, "soft", 0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_soft_kl_is_kl_teacher_to_student_times_t_squared():
    teacher, student = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    p, q = (teacher / 2).softmax(1), (student / 2).softmax(1)
    expected = 4 * (p * (p / q).log()).sum().item()
    assert softened_kl(teacher, [student], 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_hard_class_form_is_the_cross_entropy_against_the_teachers_argmax():
    teacher = torch.randn(2, 4, 5, 5)
    own = class_detail_loss(teacher, [teacher.clone()], "hard", 1.0)
    assert own.item() == pytest.approx(F.cross_entropy(teacher, teacher.argmax(1)).item())
    # any student that disagrees with the teacher's argmax somewhere pays more than the teacher itself
    assert class_detail_loss(teacher, [teacher.roll(1, dims=1)], "hard", 1.0).item() > own.item()
    # the mean or the sum over the students
    other = torch.randn(2, 4, 5, 5)
    both = own.item() + F.cross_entropy(other, teacher.argmax(1)).item()
    mean = class_detail_loss(teacher, [teacher, other], "hard", 1.0)
    total = class_detail_loss(teacher, [teacher, other], "hard", 1.0, "sum")
    assert mean.item() == pytest.approx(both / 2, rel=1e-5) and total.item() == pytest.approx(both, rel=1e-5)


def test_hard_spatial_form_is_minimal_for_a_student_uniform_on_the_teachers_support():
    teacher = torch.tensor([[[[3.0, 2.0], [0.0, -1.0]]]])  # mean 1: support = the top row
    labels = torch.ones(1, 1)
    uniform_on_support = torch.tensor([[[[0.0, 0.0], [-30.0, -30.0]]]])
    loss = spatial_detail_loss(teacher, [uniform_on_support], labels, "hard", 1.0)
    assert loss.item() == pytest.approx(0, abs=1e-6)
    assert spatial_detail_loss(teacher, [teacher], labels, "hard", 1.0).item() > 0.1
    constant = torch.zeros(1, 1, 2, 2)  # all pixels tie: the support is the whole map, never empty
    assert torch.isfinite(spatial_detail_loss(constant, [constant], labels, "hard", 1.0))


def test_spatial_form_uses_only_the_classes_in_the_image_label():
    teacher, student = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    changed = student.clone()
    changed[0, 1:] += torch.randn(2, 4, 4)  # classes not in image 0's label
    changed[1] += torch.randn(3, 4, 4)  # image 1 has no label at all
    for form in ("hard", "soft"):
        assert spatial_detail_loss(teacher, [student], labels, form, 1.0).item() == \
            pytest.approx(spatial_detail_loss(teacher, [changed], labels, form, 1.0).item())
        empty = spatial_detail_loss(teacher, [student.requires_grad_()], torch.zeros(2, 3), form, 1.0)
        assert empty.item() == 0.0 and empty.requires_grad


def test_context_loss_is_the_bce_against_the_deepest_probabilities():
    logits = [torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, -2.0]])]
    target = torch.sigmoid(logits[-1])
    expected = (F.binary_cross_entropy_with_logits(logits[0], target)
                + F.binary_cross_entropy_with_logits(logits[1], target)) / 2
    assert context_loss(logits).item() == pytest.approx(expected.item())
    assert context_loss(logits, "sum").item() == pytest.approx(2 * expected.item())
    # a student equal to the teacher is at the minimum: zero gradient
    student = logits[-1].clone().requires_grad_()
    context_loss([student, logits[-1]]).backward()
    assert student.grad.abs().max().item() < 1e-7


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("form", ["hard", "soft"])
def test_teachers_get_no_gradient_from_their_operation(form, with_mask):
    exits = hand_made_exits(channels=4 if with_mask else 3)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = torch.randint(0, 4, (2, 32, 32)) if with_mask else None
    cfg = dataclasses.replace(SR, form=form)
    terms = self_regulation_loss(exits, labels, cfg, epoch=0, mask=mask, input_size=(32, 32))
    terms["detail"].backward(retain_graph=True)
    assert exits[0][0].grad is None  # the shallow teacher of Operation II
    assert all(maps.grad is not None and maps.grad.abs().sum() > 0 for maps, _ in exits[1:])
    terms["context"].backward()
    assert exits[-1][1].grad is None  # the deep teacher of Operation III
    assert all(logits.grad.abs().sum() > 0 for _, logits in exits[:-1])


@pytest.mark.parametrize("resolution, reduction", [("teacher", "mean"), ("input", "sum")])
def test_exits_at_different_resolutions_align_and_every_term_is_summed_as_documented(resolution, reduction):
    exits = hand_made_exits(channels=4, sizes=(16, 8, 4, 2))
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = torch.randint(0, 4, (2, 32, 32))
    mask[0, :5] = 255
    cfg = SRConfig(enabled=True, w_cls=0.3, w_seg=0.5, w_sf=2.0, w_sl=3.0, form="soft", temperature=2.0,
                   detail_resolution=resolution, reduction=reduction)
    terms = self_regulation_loss(exits, labels, cfg, epoch=0, mask=mask)
    maps, logits = [m for m, _ in exits], [z for _, z in exits]
    cls = sum(multilabel_loss(z, labels) for z in logits)
    seg = sum(pixel_cross_entropy(F.interpolate(m, size=(32, 32), mode="bilinear", align_corners=False), mask)
              for m in maps)
    size = (16, 16) if resolution == "teacher" else (32, 32)
    aligned = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
    detail = softened_kl(aligned[0], aligned[1:], 2.0, reduction)
    context = context_loss(logits, reduction)
    for name, value in [("cls", cls), ("seg", seg), ("detail", detail), ("context", context)]:
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-5), name
    total = 0.3 * cls + 0.5 * seg + 2.0 * detail + 3.0 * context
    assert terms["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    cam_exits = hand_made_exits(channels=3, sizes=(16, 8, 4, 2))  # CAMs: one map per foreground class
    assert set(self_regulation_loss(cam_exits, labels, cfg, epoch=0, input_size=(32, 32))) == {
        "loss", "cls", "detail", "context"}


def test_main_classifier_weight_replaces_w_cls_for_the_main_exit_only():
    exits = hand_made_exits(channels=3, sizes=(16, 8, 4, 2))
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    logits = [z for _, z in exits]
    main = multilabel_loss(logits[-1], labels)
    auxiliary = sum(multilabel_loss(z, labels) for z in logits[:-1])
    weighted = [(None, 0.2 * (main + auxiliary)), (1.0, main + 0.2 * auxiliary), (0.0, 0.2 * auxiliary)]
    for w_main_cls, expected in weighted:
        cfg = SRConfig(enabled=True, w_sf=0.0, w_sl=0.0, w_main_cls=w_main_cls)
        terms = self_regulation_loss(exits, labels, cfg, epoch=0, input_size=(32, 32))
        assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6), w_main_cls
        assert terms["cls"].item() == pytest.approx((main + auxiliary).item(), rel=1e-6)


def test_warmup_switches_operations_two_and_three_off():
    exits = hand_made_exits()
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = torch.randint(0, 4, (2, 32, 32))
    cfg = SRConfig(enabled=True, warmup_epochs=2)
    for epoch in (0, 1):
        terms = self_regulation_loss(exits, labels, cfg, epoch=epoch, mask=mask)
        assert terms["detail"].item() == 0.0 and terms["context"].item() == 0.0
        assert terms["loss"].item() == pytest.approx((0.2 * terms["cls"] + 0.8 * terms["seg"]).item())
    terms = self_regulation_loss(exits, labels, cfg, epoch=2, mask=mask)
    assert terms["detail"].item() > 0 and terms["context"].item() > 0


def test_the_training_loop_gives_the_loss_its_epoch():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def new_parameters(self):
            return [self.weight]

    seen = []

    def compute_loss(model, batch, epoch):
        seen.append(epoch)
        return {"loss": (model.weight * batch["x"]).sum()}

    loader = torch.utils.data.DataLoader([{"x": torch.ones(1)}] * 4, batch_size=2)
    cfg = config_from_dict({"cam": {"train": {"epochs": 3}}}).cam.train
    train(Tiny(), loader, compute_loss, cfg, torch.device("cpu"), "tiny")
    assert seen == [0, 0, 1, 1, 2, 2]


# --- the networks ------------------------------------------------------------------------

@pytest.mark.parametrize("build", [camnet, deeplab])
def test_disabled_sr_is_exactly_the_baseline_network(build):
    baseline, disabled = build(), build(SRConfig(enabled=False))
    assert disabled.sr_heads is None
    assert baseline.state_dict().keys() == disabled.state_dict().keys()
    assert all(torch.equal(v, disabled.state_dict()[k]) for k, v in baseline.state_dict().items())
    assert [p.shape for p in baseline.new_parameters()] == [p.shape for p in disabled.new_parameters()]


def test_disabled_sr_gives_the_baseline_loss():
    data = batch()
    model = camnet(SRConfig(enabled=False)).train()
    expected = multilabel_loss(model(data["image"]), data["labels"])
    assert cam_stage.training_loss(SRConfig(enabled=False))(model, data, 0)["loss"].item() == expected.item()
    model = deeplab(SRConfig(enabled=False)).eval()  # eval: no dropout (in ASPP) between the two calls
    expected = pixel_cross_entropy(model(data["image"]), data["mask"])
    assert seg_stage.training_loss(SRConfig(enabled=False))(model, data, 0)["loss"].item() == expected.item()


@pytest.mark.parametrize("exits", [list(BACKBONE_LEVELS), ["layer3", "stem"]])
def test_forward_exits_are_ordered_shallow_to_deep_with_the_main_head_last(exits):
    sr = SRConfig(enabled=True, exits=exits)
    data = batch(size=64)
    for model, num_maps in ((camnet(sr).eval(), 3), (deeplab(sr).eval(), 4)):
        with torch.no_grad():
            out = model.forward_exits(data["image"])
        assert len(out) == len(exits) + 1
        sizes = [maps.shape[-1] for maps, _ in out]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] == 32 and sizes[-1] == 4
        assert all(maps.shape[:2] == (2, num_maps) and logits.shape == (2, 3) for maps, logits in out)
        with torch.no_grad():
            if isinstance(model, CAMNet):  # the main exit: exactly the network's own outputs
                torch.testing.assert_close(out[-1][1], model(data["image"]), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(F.relu(out[-1][0]), model.cams(data["image"]))
            else:
                upsampled = F.interpolate(out[-1][0], size=(64, 64), mode="bilinear", align_corners=False)
                torch.testing.assert_close(upsampled, model(data["image"]))


@pytest.mark.parametrize("stage, build", [(cam_stage, camnet), (seg_stage, deeplab)])
def test_sr_training_reaches_every_head_and_the_heads_learn_faster(stage, build):
    model = build(SR).train()
    terms = stage.training_loss(SR)(model, batch(), 0)
    assert {"loss", "cls", "detail", "context"} <= set(terms) and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.sr_heads.parameters())
    new = {id(p) for p in model.new_parameters()}
    assert all(id(p) in new for p in model.sr_heads.parameters())


@pytest.mark.parametrize("build", [camnet, deeplab])
def test_inference_runs_no_sr_head_and_the_checkpoint_is_the_baseline_network(build, tmp_path):
    model = build(SR).eval()
    calls = []
    model.sr_heads.register_forward_pre_hook(lambda *args: calls.append(1))
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        output = model.cams(image) if isinstance(model, CAMNet) else model(image)
    assert calls == []

    save_checkpoint(tmp_path / "model.pt", model)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert not [k for k in state if "sr_heads" in k]
    baseline = build()
    load_checkpoint(tmp_path / "model.pt", baseline)  # strict
    baseline.eval()
    assert sum(p.numel() for p in baseline.parameters()) == sum(p.numel() for p in build().parameters())
    with torch.no_grad():
        again = baseline.cams(image) if isinstance(model, CAMNet) else baseline(image)
    assert torch.equal(output, again)


# --- end to end ----------------------------------------------------------------------------

@pytest.mark.e2e
def test_tiny_pipeline_with_sr_in_both_networks(tmp_path):
    from conftest import run

    sr = ["--set", "cam.sr.enabled=true", "--set", "seg.sr.enabled=true", "--set", "seg.sr.form=soft",
          "--set", "cam.sr.exits=[stem, layer2]", "--set", "cam.scales=[1.0]"]
    assert run(tmp_path, *sr) == 0
    for stage in ("cam", "refine", "seg"):
        metrics = json.loads((tmp_path / "run" / stage / "metrics.json").read_text())
        assert 0.0 <= metrics["miou"] <= 1.0
    for stage, build in (("cam", lambda: CAMNet(BACKBONE, 7)),
                         ("seg", lambda: DeepLab(BACKBONE, 8, [6, 12, 18]))):
        load_checkpoint(tmp_path / "run" / stage / "model.pt", build())  # strict: no SR head inside
    manifest = json.loads((tmp_path / "run" / "cam" / "manifest.json").read_text())
    # SR settings are part of the cache key.
    assert manifest["inputs"]["config"]["cam"]["sr"]["enabled"] is True


def test_pooled_exit_classifier_makes_each_exit_map_the_cam_of_its_class():
    from pipeline.methods.self_regulation import ExitHead
    head = ExitHead(in_channels=8, hidden=4, num_maps=3, num_foreground=3, pooled=True)
    maps, logits = head(torch.randn(2, 8, 6, 6))
    assert torch.allclose(logits, maps.mean(dim=(2, 3)))
    with pytest.raises(ConfigError, match="'seg.sr.exit_classifier' is pooled"):
        config_from_dict({"seg": {"sr": {"exit_classifier": "pooled"}}})


def test_cam_exit_mask_loss_is_the_per_class_bce_over_labelled_pixels_summed_over_exits():
    mask = torch.tensor([[[0, 1, 2], [2, 255, 1]]])  # background, classes 1 and 2, one unlabelled
    right = torch.full((1, 2, 2, 3), -20.0)
    right[0, 0][mask[0] == 1] = 20.0
    right[0, 1][mask[0] == 2] = 20.0
    wrong = -right
    assert cam_exit_mask_loss([right], mask) < 1e-6
    # Every labelled (pixel, class) pair wrong by a logit of 20: a BCE of 20 each.
    assert cam_exit_mask_loss([wrong], mask) == pytest.approx(20.0, rel=1e-4)
    assert cam_exit_mask_loss([right, wrong], mask) == pytest.approx(20.0, rel=1e-4)
    # The unlabelled pixel counts for nothing, whatever the map says there.
    changed = right.clone()
    changed[0, :, 1, 1] = 50.0
    assert cam_exit_mask_loss([changed], mask) < 1e-6
    # Maps at another resolution are upsampled to the mask's; no labelled pixel: 0 with a gradient.
    small = torch.zeros(1, 2, 1, 1, requires_grad=True)
    assert cam_exit_mask_loss([small], mask).item() == pytest.approx(F.binary_cross_entropy_with_logits(
        torch.zeros(1), torch.zeros(1)).item())
    empty = cam_exit_mask_loss([small], torch.full((1, 2, 3), 255))
    empty.backward()
    assert empty.item() == 0.0 and small.grad is not None


def test_gated_detail_loss_ignores_everything_outside_the_main_cams_support():
    torch.manual_seed(0)
    labels = torch.tensor([[1.0, 0.0]])
    gate = torch.zeros(1, 2, 4, 4)
    gate[0, 0, :2] = 1.0  # the main CAM's support: the top half
    teacher, student = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = spatial_detail_loss(teacher, [student], labels, "hard", 1.0, gate=gate)
    loss.backward()
    assert student.grad[0, 0, 2:].abs().max() == 0 and student.grad[0, 0, :2].abs().max() > 0
    changed_teacher, changed_student = teacher.clone(), student.detach().clone()
    changed_teacher[0, 0, 2:] += 100.0
    changed_student[0, 0, 2:] -= 5.0
    assert spatial_detail_loss(changed_teacher, [changed_student], labels, "hard", 1.0, gate=gate) == \
        pytest.approx(loss.item())
    # A student uniform on the teacher's support inside the gate scores the minimum, 0.
    inside = teacher[0, 0, :2]
    uniform = torch.full((1, 2, 4, 4), -50.0)
    uniform[0, 0, :2] = torch.where(inside >= inside.mean(), 0.0, -50.0)
    assert spatial_detail_loss(teacher, [uniform], labels, "hard", 1.0, gate=gate) < 1e-6
    # Ungated, the same call is the authors' form.
    assert spatial_detail_loss(teacher, [student], labels, "hard", 1.0).item() == pytest.approx(
        spatial_detail_loss(teacher, [student], labels, "hard", 1.0, gate=torch.ones(1, 2, 4, 4)).item())


@pytest.mark.parametrize("raw, match", [
    ({"seg": {"sr": {"detail_gate": "deep"}}}, "'seg.sr.detail_gate'"),
    ({"cam": {"sr": {"detail_gate": "deep", "form": "soft"}}}, "'cam.sr.detail_gate'"),
    ({"seg": {"sr": {"detail_target": "energy"}}}, "'seg.sr.detail_target'"),
    ({"cam": {"sr": {"detail_target": "energy", "detail_gate": "deep"}}}, "'cam.sr.detail_gate'"),
])
def test_detail_gate_errors_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_energy_detail_loss_is_attention_transfer_from_the_shallowest_map():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 8, 8)
    energy = teacher.pow(2).mean(dim=1, keepdim=True)
    # A student whose energy is the teacher's, area-pooled to its size (times any factor): 0.
    matching = (3.0 * F.avg_pool2d(energy, 2)).sqrt().expand(2, 7, 4, 4).clone().requires_grad_(True)
    assert energy_detail_loss([teacher, matching]).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 7, 4, 4, requires_grad=True)
    loss = energy_detail_loss([teacher.requires_grad_(True), other, matching])
    assert 0 < loss.item() <= 4.0
    loss.backward()
    assert teacher.grad is None and other.grad.abs().sum() > 0  # the teacher learns nothing from it
    # Summed over the students, or their mean.
    assert energy_detail_loss([teacher, other, other], "sum").item() == pytest.approx(
        2 * energy_detail_loss([teacher, other], "mean").item())


def test_cam_stage_energy_target_reaches_the_backbone_through_every_student_level():
    sr = dataclasses.replace(SR, detail_target="energy", w_cls=0.0, w_main_cls=0.0, w_sl=0.0)
    model = camnet(sr).train()
    terms = cam_stage.training_loss(sr)(model, batch(), 0)
    assert terms["detail"] > 0
    terms["loss"].backward()
    # Only Operation II is on: its gradient reaches the deepest backbone level, not the exits' heads.
    assert model.backbone.parameters().__next__().grad is not None
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.sr_heads.parameters())
