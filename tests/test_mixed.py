"""Mixed supervision: weak-label construction, the full subset, batch composition, the
teacher-student losses and the medical scores."""
import math

import numpy as np
import pytest
import torch
from conftest import two_object_mask
from PIL import Image

from pipeline.core.config import BackboneConfig, Config, CopyPasteConfig, MixedConfig, SRConfig, TrainConfig
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.metrics import SegmentationScores, hd95
from pipeline.data.dataset import IGNORE, VOCDataset
from pipeline.data.training_set import TrainingSet
from pipeline.methods.mixed import (
    SCRIBBLES,
    EMANetwork,
    MixedBatchSampler,
    MixedTrainingSet,
    box_inside,
    check_copy_paste_shares,
    copy_paste_start_epoch,
    eroded_core,
    full_subset,
    mean_entropy,
    mixed_fingerprint,
    mixed_pseudo_label_loss,
    mixed_supervision_loss,
    paired_indices,
    paste_pairs,
    squared_dice_loss,
    teacher_student_kl,
    weak_labels,
)
from pipeline.models.networks import DeepLab, segmentation_network


def test_eroded_core_keeps_a_small_centred_core_of_every_foreground_region():
    mask = np.zeros((40, 40), np.uint8)
    mask[5:25, 5:25] = 1      # a 20x20 square
    mask[30:33, 30:39] = 2    # a thin bar: must not vanish
    mask[0:2, :] = IGNORE
    weak = eroded_core(mask, keep=0.05)
    assert set(np.unique(weak)) == {1, 2, IGNORE}  # the background stays unlabelled
    labelled = weak != IGNORE
    assert (weak[labelled] == mask[labelled]).all()  # never a label the full mask does not have
    square = np.argwhere(weak == 1)
    assert 1 <= len(square) <= 0.1 * 400
    assert np.abs(square.mean(axis=0) - [14.5, 14.5]).max() < 1.5  # the core sits in the middle
    assert (weak == 2).sum() >= 1
    # On request the background gets its core too, and then it outweighs the foreground.
    with_background = eroded_core(mask, keep=0.05, erode_background=True)
    assert set(np.unique(with_background)) == {0, 1, 2, IGNORE}
    assert (with_background[weak != IGNORE] == weak[weak != IGNORE]).all()
    assert (with_background == 0).sum() > (with_background == 1).sum() + (with_background == 2).sum()
    assert (with_background != IGNORE).mean() < 0.15


def test_weak_labels_follow_weak_source_and_erode_background(voc_folder):
    dataset = VOCDataset(voc_folder)
    foreground_only = weak_labels(MixedConfig(weak_source="erode"), dataset, pseudo_masks=None)("a")
    with_background = weak_labels(MixedConfig(weak_source="erode", erode_background=True), dataset, None)("a")
    assert set(np.unique(foreground_only)) == {1, 2, IGNORE}
    assert set(np.unique(with_background)) == {0, 1, 2, IGNORE}


def test_scribbles_are_checked_for_size_and_class_indices(voc_folder):
    dataset = VOCDataset(voc_folder)
    cfg = Config(mode="mixed", mixed=MixedConfig(weak_source="scribble"))
    (voc_folder / SCRIBBLES).mkdir()
    scribbles = {image_id: np.full_like(dataset.load_mask(image_id), IGNORE)
                 for image_id in ("a", "b", "empty")}
    for image_id, scribble in scribbles.items():
        scribble[5, 5:10] = 1
        Image.fromarray(scribble).save(voc_folder / SCRIBBLES / f"{image_id}.png")
    before = mixed_fingerprint(cfg, dataset)
    assert weak_labels(cfg.mixed, dataset, None)("b")[5, 6] == 1
    scribbles["b"][6, 5] = 3  # classes.txt names 3 classes: index 3 is not one
    Image.fromarray(scribbles["b"]).save(voc_folder / SCRIBBLES / "b.png")
    with pytest.raises(DataError, match=r"Scribbles/b.png has class index 3"):
        mixed_fingerprint(cfg, dataset)
    scribbles["b"][6, 5] = 2  # a valid change of one pixel is a different input
    Image.fromarray(scribbles["b"]).save(voc_folder / SCRIBBLES / "b.png")
    assert mixed_fingerprint(cfg, dataset) != before
    Image.fromarray(scribbles["b"][:, :-1]).save(voc_folder / SCRIBBLES / "b.png")
    with pytest.raises(DataError, match=r"Scribbles/b.png are 31x32 but the image is 32x32"):
        mixed_fingerprint(cfg, dataset)


def test_full_subset_is_a_seeded_fraction_or_a_checked_list(tmp_path):
    ids = [f"img{i:03d}" for i in range(50)]
    picked = full_subset(ids, MixedConfig(full_fraction=0.1), seed=0)
    assert len(picked) == 5 and set(picked) <= set(ids)
    assert full_subset(ids, MixedConfig(full_fraction=0.1), seed=0) == picked
    assert full_subset(ids, MixedConfig(full_fraction=0.1), seed=1) != picked
    listed = tmp_path / "full.txt"
    listed.write_text("img007\nimg003\n")
    assert full_subset(ids, MixedConfig(full_list=str(listed)), seed=0) == ["img003", "img007"]
    listed.write_text("img007\nnot_a_train_id\n")
    with pytest.raises(DataError, match="full.txt names 'not_a_train_id'"):
        full_subset(ids, MixedConfig(full_list=str(listed)), seed=0)


def test_batches_have_a_fixed_composition_and_cycle_the_small_full_subset():
    full, weak = [0, 1, 2], list(range(3, 60))
    sampler = MixedBatchSampler(full, weak, batch_size=12, weak_per_full=5,
                                generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 60 // 12
    for batch in batches:
        assert len(batch) == 12
        assert set(batch[:2]) <= set(full) and set(batch[2:]) <= set(weak)
        assert len(set(batch[2:])) == 10  # without replacement within a pass
    assert {i for batch in batches for i in batch[:2]} == set(full)
    alone = MixedBatchSampler(full, weak, batch_size=4, weak_per_full=0,
                              generator=torch.Generator().manual_seed(0))
    assert all(set(batch) <= set(full) for batch in alone)


def test_kl_is_zero_for_equal_branches_and_reaches_the_teacher_unless_detached():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 5)
    assert teacher_student_kl(logits, logits.clone(), 2.0, False).abs() < 1e-6
    teacher = torch.randn(2, 4, 5, 5, requires_grad=True)
    student = torch.randn(2, 4, 5, 5, requires_grad=True)
    kl = teacher_student_kl(teacher, student, 2.0, detach_teacher=False)
    assert kl > 0
    kl.backward()
    assert teacher.grad.abs().sum() > 0 and student.grad.abs().sum() > 0
    teacher.grad = student.grad = None
    teacher_student_kl(teacher, student, 2.0, detach_teacher=True).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_kl_has_the_authors_scale_and_stays_bounded_for_opposite_confident_branches():
    """Softmax outputs softened again at T = 2: two confident branches on different classes
    give, per pixel, (q_hi - q_lo) * log(q_hi / q_lo) summed over classes, averaged over the
    4 classes and times 0.5 T^2, however large the logits (the logit form would grow with them)."""
    teacher, student = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    teacher[:, 0], student[:, 1] = 1000.0, 1000.0
    high, low = math.exp(0.5) / (math.exp(0.5) + 3), 1 / (math.exp(0.5) + 3)
    expected = (high - low) * 0.5 / 4 * 0.5 * 2.0 ** 2
    assert math.isclose(teacher_student_kl(teacher, student, 2.0, False).item(), expected, rel_tol=1e-5)


def test_entropy_is_log_c_over_c_for_uniform_and_near_zero_for_confident_predictions():
    assert torch.isclose(mean_entropy(torch.zeros(1, 4, 3, 3)), torch.log(torch.tensor(4.0)) / 4)
    confident = torch.zeros(1, 4, 3, 3)
    confident[:, 2] = 30.0
    assert mean_entropy(confident) < 1e-6
    assert mean_entropy(torch.zeros(0, 4, 3, 3)) == 0


def small_mixed_batch(voc_folder):
    """A two-branch ResNet-18 segmenter (eval mode) and one batch of "a" (full), "b" and "empty"
    (weak), whole 32-px images."""
    torch.manual_seed(0)
    dataset = VOCDataset(voc_folder)
    model = DeepLab(BackboneConfig(name="resnet18"), 3, [1, 2, 3], teacher_head=True).eval()
    training_set = MixedTrainingSet(dataset, ["a", "b", "empty"], ["a"], dataset.load_train_mask,
                                    TrainConfig(crop_size=32, scale_range=[1.0, 1.0]))
    return model, torch.utils.data.default_collate([training_set[i] for i in range(3)])


def test_mixed_loss_trains_the_teacher_on_full_images_only(voc_folder):
    """The teacher's term must not depend on a weak image's labels; the student's entropy
    only on weak images."""
    model, batch = small_mixed_batch(voc_folder)
    assert batch["is_full"].tolist() == [True, False, False]
    assert (batch["mask"][1:] == IGNORE).all() and (batch["mask"][0] != IGNORE).any()
    cfg = MixedConfig()
    terms = mixed_supervision_loss(model, batch, 0, cfg, SRConfig())
    expected = terms["teacher"] + 0.1 * terms["partial"] + 20 * terms["kl"] + terms["entropy"]
    assert torch.isclose(terms["loss"], expected)
    changed = dict(batch, weak_mask=torch.zeros_like(batch["weak_mask"]))
    again = mixed_supervision_loss(model, changed, 0, cfg, SRConfig())
    assert torch.isclose(again["teacher"], terms["teacher"])
    assert not torch.isclose(again["partial"], terms["partial"])
    sr_model = DeepLab(BackboneConfig(name="resnet18"), 3, [1, 2, 3], SRConfig(enabled=True),
                       teacher_head=True).eval()
    sr_terms = mixed_supervision_loss(sr_model, batch, 0, cfg, SRConfig(enabled=True))
    assert torch.isfinite(sr_terms["loss"])
    # seg.loss cross_entropy_dice: the Dice joins the teacher's term; the student's terms stay
    dice = mixed_supervision_loss(model, batch, 0, cfg, SRConfig(), teacher_loss="cross_entropy_dice")
    assert dice["teacher"] > terms["teacher"]
    assert all(torch.isclose(dice[name], terms[name]) for name in ("partial", "kl", "entropy"))


def test_partial_ce_and_entropy_follow_the_authors_code_or_the_pooled_weak_only_choice(voc_folder):
    """Defaults: the full and the weak images' partial cross-entropies each averaged on its own,
    then added; the entropy over every student output with each full image counted three times."""
    from pipeline.methods.losses import pixel_cross_entropy

    model, batch = small_mixed_batch(voc_folder)
    with torch.no_grad():
        student = model.forward_branches(batch["image"], with_exits=False)["student"]
        weak, full = batch["weak_mask"], batch["is_full"]
        authors = mixed_supervision_loss(model, batch, 0, MixedConfig(), SRConfig())
        pooled = MixedConfig(partial_ce="pooled", entropy_on="weak")
        ours = mixed_supervision_loss(model, batch, 0, pooled, SRConfig())
    summed = pixel_cross_entropy(student[full], weak[full]) + pixel_cross_entropy(student[~full], weak[~full])
    assert torch.isclose(authors["partial"], summed)
    assert torch.isclose(ours["partial"], pixel_cross_entropy(student, weak))
    assert not torch.isclose(authors["partial"], ours["partial"])
    per_image = [mean_entropy(student[i:i + 1]) for i in range(3)]  # one full image (a), two weak
    assert torch.isclose(authors["entropy"], (3 * per_image[0] + per_image[1] + per_image[2]) / 5)
    assert torch.isclose(ours["entropy"], (per_image[1] + per_image[2]) / 2)


def test_squared_dice_is_wsl4mis_dice_over_every_class_and_the_whole_batch():
    target = torch.tensor([[[0, 1], [2, 2]]])
    exact = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert squared_dice_loss(exact, target) < 1e-6
    # uniform probabilities over 3 classes: per class 2 * (n_c / 3) / (4 / 9 + n_c), n_c = 1, 1, 2
    uniform = torch.full((1, 3, 2, 2), 1 / 3)
    per_class = [2 * (n / 3) / (4 / 9 + n) for n in (1, 1, 2)]
    assert math.isclose(squared_dice_loss(uniform, target).item(), 1 - sum(per_class) / 3, rel_tol=1e-4)


def test_squared_dice_over_some_pixels_is_the_dice_of_those_pixels_alone():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 4, 4), dim=1)
    target = torch.randint(0, 3, (2, 4, 4))
    first_image = torch.zeros(2, 4, 4, dtype=torch.bool)
    first_image[0] = True
    alone = squared_dice_loss(probs[:1], target[:1])
    assert torch.isclose(squared_dice_loss(probs, target, first_image), alone)


def test_mixed_pseudo_labels_are_a_random_mix_of_both_branches_and_train_both():
    """Branches that agree need no change; where they disagree the pseudo mask is the argmax of
    beta p_student + (1 - beta) p_teacher, so which branch it follows depends on the draw."""
    agree = torch.zeros(2, 3, 4, 4)
    agree[:, 1] = 20.0
    assert mixed_pseudo_label_loss(agree, agree.clone()) < 1e-6
    student = torch.zeros(1, 3, 4, 4, requires_grad=True)
    teacher = torch.zeros(1, 3, 4, 4, requires_grad=True)
    with torch.no_grad():  # unequal: which branch the pseudo mask follows changes the loss
        student[:, 1], teacher[:, 2] = 5.0, 2.0
        teacher[:, 2, :2] = 8.0
    torch.manual_seed(0)
    loss = mixed_pseudo_label_loss(student, teacher)
    loss.backward()
    assert loss > 0 and student.grad.abs().sum() > 0 and teacher.grad.abs().sum() > 0
    p_student, p_teacher = torch.softmax(student, 1).detach(), torch.softmax(teacher, 1).detach()
    torch.manual_seed(0)
    beta = torch.rand(()).item() + 1e-10
    pseudo = (beta * p_student + (1 - beta) * p_teacher).argmax(1)
    expected = 0.5 * (squared_dice_loss(p_student, pseudo) + squared_dice_loss(p_teacher, pseudo))
    assert torch.isclose(loss, expected)
    follows = {}  # beta near 0 follows the teacher, near 1 the student
    for name, beta in (("teacher", 1e-10), ("student", 1.0)):
        mixed = (beta * p_student + (1 - beta) * p_teacher).argmax(1)
        follows[name] = 0.5 * (squared_dice_loss(p_student, mixed) + squared_dice_loss(p_teacher, mixed))
    assert not torch.isclose(follows["teacher"], follows["student"])
    losses = set()
    for seed in range(20):
        torch.manual_seed(seed)
        losses.add(round(mixed_pseudo_label_loss(student, teacher).item(), 5))
    assert len(losses) > 1  # the draw decides
    assert mixed_pseudo_label_loss(torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4)) == 0


def test_dmpls_term_joins_the_loss_on_weak_images_only_and_is_absent_at_zero_weight(voc_folder):
    model, batch = small_mixed_batch(voc_folder)
    off = mixed_supervision_loss(model, batch, 0, MixedConfig(), SRConfig())
    assert "dmpls" not in off
    torch.manual_seed(1)
    on = mixed_supervision_loss(model, batch, 0, MixedConfig(w_dmpls=0.5), SRConfig())
    assert torch.isclose(on["loss"], off["loss"] + 0.5 * on["dmpls"])
    with torch.no_grad():
        branches = model.forward_branches(batch["image"], with_exits=False)
    torch.manual_seed(1)
    weak_only = mixed_pseudo_label_loss(branches["student"][1:], branches["teacher"][1:])
    assert torch.isclose(on["dmpls"], weak_only)


def test_bcp_box_is_two_thirds_of_each_side_somewhere_inside():
    torch.manual_seed(0)
    for _ in range(20):
        inside = box_inside(30, 12, torch.device("cpu"))
        rows, cols = inside.any(dim=1).nonzero()[:, 0], inside.any(dim=0).nonzero()[:, 0]
        assert (len(rows), len(cols)) == (20, 8) and inside.sum() == 160
        assert rows.max() - rows.min() == 19 and cols.max() - cols.min() == 7


def test_bcp_pastes_both_ways_and_labels_each_pixel_by_the_image_it_comes_from():
    """Images 0-3 full (masks and weak labels 10-13), 4-7 weak (weak labels 14-17, pseudo masks
    20-23 in the order a's then b's): pairs a are (0, 4) and (1, 5), pairs b (2, 6) and (3, 7)."""
    image = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 4, 4)
    mask = torch.tensor([10, 11, 12, 13] + [IGNORE] * 4).view(8, 1, 1).expand(8, 4, 4)
    weak = torch.arange(10, 18).view(8, 1, 1).expand(8, 4, 4)
    full = torch.tensor([True] * 4 + [False] * 4)
    batch = {"image": image, "mask": mask, "weak_mask": weak, "is_full": full}
    pseudo = torch.arange(20, 24).view(4, 1, 1).expand(4, 4, 4)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[1:3, 1:3] = True
    indices = paired_indices(full)
    assert [half.tolist() for half in indices] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    mixed = paste_pairs(batch, pseudo, inside, indices)

    def boxed(box, outer):
        return torch.where(inside, box, outer)

    # net_input_unl: weak image 4 (5) with full image 0's (1's) box;
    # net_input_l: full image 2 (3) with weak image 6's (7's) box
    for row, (outer, box) in enumerate([(4, 0), (5, 1), (2, 6), (3, 7)]):
        assert torch.equal(mixed["images"][row, 0], boxed(float(box), float(outer)))
        assert torch.equal(mixed["weak_masks"][row], boxed(10 + box, 10 + outer))
    assert torch.equal(mixed["full_masks"][0], boxed(10, IGNORE))
    assert torch.equal(mixed["full_masks"][3], boxed(IGNORE, 13))
    assert torch.equal(mixed["pseudo_masks"][1], boxed(IGNORE, 21))  # weak image 5's, outside the box
    assert torch.equal(mixed["pseudo_masks"][2], boxed(22, IGNORE))  # weak image 6's, in the box
    assert torch.equal(mixed["from_full"], torch.stack([inside, inside, ~inside, ~inside]))


def test_copy_paste_shares_need_two_pairs_per_process_before_training():
    check_copy_paste_shares(8, 8, 1)
    check_copy_paste_shares(8, 8, 2)
    for full, weak, processes in ((8, 8, 8), (16, 0, 1), (1, 15, 1)):
        with pytest.raises(ConfigError, match="two full and two weak images"):
            check_copy_paste_shares(full, weak, processes)


def test_kl_over_some_pixels_is_the_kl_of_those_pixels_alone():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    first = torch.zeros(2, 3, 3, dtype=torch.bool)
    first[0] = True
    alone = teacher_student_kl(teacher[:1], student[:1], 2.0, False)
    assert torch.isclose(teacher_student_kl(teacher, student, 2.0, False, pixels=first), alone)


def test_ema_copies_first_then_follows_at_its_decay_and_travels_in_the_checkpoint_not_model_pt(tmp_path):
    from pipeline.core.training import save_checkpoint

    cfg = Config(mode="mixed", mixed=MixedConfig(copy_paste=CopyPasteConfig(enabled=True)))
    cfg.seg.backbone = BackboneConfig(name="resnet18")
    model = segmentation_network(cfg, 3, training=True)
    assert isinstance(model.ema, EMANetwork) and not model.ema.started
    assert not any(p.requires_grad for p in model.ema.parameters())
    first = next(model.parameters())
    with torch.no_grad():
        first.fill_(1.0)
    model.ema.follow(model, 0.99)
    copied = next(model.ema.network.parameters())
    assert model.ema.started and torch.equal(copied, first)
    with torch.no_grad():
        first.fill_(2.0)
    model.ema.follow(model, 0.99)
    assert torch.allclose(copied, torch.full_like(copied, 0.99 * 1.0 + 0.01 * 2.0))
    again = segmentation_network(cfg, 3, training=True)
    again.load_state_dict(model.state_dict())  # the training checkpoint's way
    assert again.ema.started and torch.equal(next(again.ema.network.parameters()), copied)
    save_checkpoint(tmp_path / "model.pt", model)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert not any(key.startswith("ema.") for key in saved)
    segmentation_network(cfg, 3, training=False).load_state_dict(saved)  # strict: nothing left over
    assert copy_paste_start_epoch(cfg.mixed.copy_paste, 16) == 4
    assert copy_paste_start_epoch(CopyPasteConfig(enabled=True, start=0.3), 5) == 1  # rounded down
    assert copy_paste_start_epoch(MixedConfig().copy_paste, 16) is None


def test_copy_paste_refuses_a_batch_share_without_two_pairs_and_makes_largest_component_a_training_key(
        voc_folder):
    from pipeline.core.config import DataConfig
    from pipeline.core.errors import TrainingError
    from stages.seg import own_inputs

    with pytest.raises(TrainingError, match="two full and two weak images"):
        paired_indices(torch.tensor([True, False, False]))
    assert [len(half) for half in paired_indices(torch.tensor([True] * 3 + [False] * 5))] == [1, 1, 1, 1]

    def training_key(copy_paste: bool, largest: bool) -> dict:
        cfg = Config(mode="mixed", data=DataConfig(root=str(voc_folder)),
                     mixed=MixedConfig(weak_source="erode", copy_paste=CopyPasteConfig(enabled=copy_paste)))
        cfg.seg.largest_component = largest
        return own_inputs(cfg)["config"]

    assert training_key(False, True) == training_key(False, False)  # a scoring key: same network
    assert training_key(True, True) != training_key(True, False)  # it cuts the EMA's pseudo masks


def test_copy_paste_steps_train_on_the_mixed_inputs_after_the_start_epoch(voc_folder):
    torch.manual_seed(0)
    dataset = VOCDataset(voc_folder)
    cfg = Config(mode="mixed", mixed=MixedConfig(copy_paste=CopyPasteConfig(enabled=True)))
    cfg.seg.backbone = BackboneConfig(name="resnet18")
    model = segmentation_network(cfg, 3, training=True).train()
    ids = ["a", "b", "empty", "a"]
    training_set = MixedTrainingSet(dataset, ids, ["a"], dataset.load_train_mask,
                                    TrainConfig(crop_size=32, scale_range=[1.0, 1.0]))
    batch = torch.utils.data.default_collate([training_set[i] for i in (0, 3, 1, 2)])
    plain = mixed_supervision_loss(model, batch, 0, cfg.mixed, SRConfig(), copy_paste_from=1)
    assert "copy_paste" not in plain and not model.ema.started
    terms = mixed_supervision_loss(model, batch, 1, cfg.mixed, SRConfig(), copy_paste_from=1,
                                   largest_component=True)
    assert model.ema.started and torch.isfinite(terms["loss"]) and terms["copy_paste"] > 0
    expected = (terms["teacher"] + 0.1 * terms["partial"] + 20 * terms["kl"] + terms["entropy"]
                + terms["copy_paste"])
    assert torch.isclose(terms["loss"], expected)
    terms["loss"].backward()
    for branch in (model.head, model.teacher_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters())
    assert all(p.grad is None for p in model.ema.parameters())
    # DMPLS together with copy-paste: its Dice on the pixels the weak images give
    both = MixedConfig(w_dmpls=0.5, copy_paste=CopyPasteConfig(enabled=True))
    together = mixed_supervision_loss(model, batch, 1, both, SRConfig(), copy_paste_from=1)
    assert 0 < together["dmpls"] < 1
    expected = (together["teacher"] + 0.1 * together["partial"] + 20 * together["kl"] + together["entropy"]
                + together["copy_paste"] + 0.5 * together["dmpls"])
    assert torch.isclose(together["loss"], expected)


def test_every_mask_gets_the_image_augmentation(voc_folder):
    dataset = VOCDataset(voc_folder)
    torch.manual_seed(3)
    training_set = TrainingSet(dataset, ["a"], TrainConfig(crop_size=24, scale_range=[0.6, 1.7]),
                               pixel_labels={"mask": dataset.load_mask, "copy": dataset.load_mask})
    for _ in range(5):
        item = training_set[0]
        assert torch.equal(item["mask"], item["copy"])


def test_hd95_and_dice_on_hand_made_masks():
    square = np.zeros((40, 40), bool)
    square[10:20, 10:20] = True
    assert hd95(square, square) == 0.0
    shifted = np.roll(square, 3, axis=1)
    assert hd95(square, shifted) == pytest.approx(3.0)
    scores = SegmentationScores(["background", "a", "b"])
    gt = two_object_mask(size=32)
    pred = gt.copy()
    pred[pred == 2] = 0  # class b missed entirely
    scores.add(gt, pred)
    result = scores.result()
    assert result["per_class_dice"]["a"] == 1.0 and result["per_class_dice"]["b"] == 0.0
    assert result["mean_dice"] == pytest.approx(0.5)
    assert result["per_class_hd95"] == {"a": 0.0, "b": None} and result["hd95_unmatched"] == {"a": 0, "b": 1}


def test_soft_dice_is_zero_for_a_confident_right_prediction_one_for_a_wrong_one_and_skips_unlabelled():
    import torch.nn.functional as F

    from pipeline.methods.losses import soft_dice_loss
    mask = torch.tensor([[[0, 1, 2, 255]]])
    right = F.one_hot(torch.tensor([[[0, 1, 2, 0]]]), 3).permute(0, 3, 1, 2).float() * 50
    wrong = F.one_hot(torch.tensor([[[0, 2, 1, 0]]]), 3).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(right, mask).item() < 1e-4 and soft_dice_loss(wrong, mask).item() > 0.999
    moved = right.clone()
    moved[0, :, 0, 3] = torch.tensor([0.0, 50.0, 0.0])  # class 1 where the mask is unlabelled
    assert soft_dice_loss(moved, mask).item() < 1e-4
    nothing = torch.full((1, 1, 4), 255)
    logits = torch.zeros(1, 3, 1, 4, requires_grad=True)
    loss = soft_dice_loss(logits, nothing)
    loss.backward()
    assert loss.item() == 0 and logits.grad is not None


def test_cross_entropy_dice_adds_the_soft_dice_to_the_cross_entropy():
    from pipeline.methods.losses import mask_loss, pixel_cross_entropy, soft_dice_loss
    torch.manual_seed(0)
    logits, mask = torch.randn(2, 4, 6, 6), torch.randint(0, 4, (2, 6, 6))
    assert mask_loss(logits, mask, "cross_entropy") == pixel_cross_entropy(logits, mask)
    assert torch.isclose(mask_loss(logits, mask, "cross_entropy_dice"),
                         pixel_cross_entropy(logits, mask) + soft_dice_loss(logits, mask))
