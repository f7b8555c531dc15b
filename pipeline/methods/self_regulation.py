"""Self-Regulation (Zhang, Zhang, Tang, Hua, Sun, "Self-Regulation for Semantic Segmentation", ICCV 2021).

Training-only losses that let the shallow and the deep layers of a network regulate
each other, with no extra labels and no cost at inference.

Multi-exit architecture: every configured backbone level (``sr.exits``) gets an
:class:`ExitHead`, a small segmenter (two 3x3 conv-BN-ReLU of ``sr.head_channels``
channels, then a 1x1 conv to the network's class maps) and a classifier (global
average pooling of those maps, then a linear layer to the foreground logits). The
network's own head is the deepest exit. Exits are ordered shallow -> deep, main last;
each is a ``(maps, logits)`` pair with maps at the level's own resolution.

* Operation I, supervise every exit: image-level BCE on every exit's logits, plus
  (seg stage) pixel cross-entropy on every exit's maps upsampled to the label size.
* Operation II, Shallow Teacher, Deep Students (details): the shallowest exit's maps
  (detached) are the target of every deeper exit's maps, all upsampled to the input size
  (``detail_resolution: input``, the authors') or to the teacher's own resolution
  (``teacher``: stride 2 for a ``stem`` teacher, a quarter of the input's pixels). Seg stage:
  per pixel, the distribution over classes; ``form: hard`` is the cross-entropy against the
  teacher's argmax (the authors' code), ``form: soft`` the KL(teacher || student) of
  temperature-softened softmaxes times T^2. Cam stage (the maps are CAMs, there is no
  background class): per class in the image label, the distribution over pixels, softmax over
  the map at temperature T; ``soft`` is the same KL, ``hard`` the KL from the uniform
  distribution over the teacher's pixels at or above its spatial mean (the cross-entropy
  against it less its constant entropy); with ``detail_gate: deep`` both distributions are
  taken over the main CAM's own above-mean support only.
* Operation III, Deep Teacher, Shallow Students (context): the deepest exit's class
  probabilities (sigmoid, detached) are BCE targets of every shallower exit's logits.

Total: ``w_cls * sum_exits L_cls + w_seg * sum_exits L_seg + w_sf * L_II + w_sl * L_III``
where L_II and L_III are sums over their students (``reduction: sum``, the authors'
trainval.py:143-169 with losses.py:100-134) or means (``mean``: their weights then do not
depend on how many exits are configured); ``w_main_cls``, when set, replaces ``w_cls`` for
the main exit's own image-level loss. During the first ``warmup_epochs`` only Operation I is on.

The heads live in the model's ``sr_heads`` submodule, which the inference path never
calls and :func:`pipeline.train.save_checkpoint` leaves out of ``model.pt``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.config import BACKBONE_LEVELS, SRConfig
from pipeline.data.dataset import IGNORE
from pipeline.methods.losses import multilabel_loss, pixel_cross_entropy
from pipeline.models.layers import conv_bn_relu

Exit = tuple[torch.Tensor, torch.Tensor]  # (maps B x C x h x w, image-level logits B x (C-1 foreground))


class ExitHead(nn.Module):
    """Segmenter (2 x 3x3 conv-BN-ReLU, 1x1 conv to ``num_maps``) and classifier: GAP then a
    linear layer (the authors' ClassLayer), or with ``pooled`` the GAP of each map alone as its
    class's logit (for CAMs: each exit's map of a class is then trained as a CAM of that class,
    as the main CAM is, rather than mixed with the others by a linear layer)."""

    def __init__(self, in_channels: int, hidden: int, num_maps: int, num_foreground: int,
                 pooled: bool = False):
        super().__init__()
        self.segmenter = nn.Sequential(
            *conv_bn_relu(in_channels, hidden), *conv_bn_relu(hidden, hidden), nn.Conv2d(hidden, num_maps, 1),
        )
        self.classifier = nn.Identity() if pooled else nn.Linear(num_maps, num_foreground)

    def forward(self, features: torch.Tensor) -> Exit:
        maps = self.segmenter(features)
        return maps, self.classifier(maps.mean(dim=(2, 3)))


class SRHeads(nn.Module):
    """The training-only exits of a network: one :class:`ExitHead` per configured level, and
    the classifier of the main exit where the network has none of its own (DeepLab)."""

    def __init__(self, cfg: SRConfig, channels: list[int], num_maps: int, num_foreground: int,
                 main_classifier: bool):
        super().__init__()
        pooled = cfg.exit_classifier == "pooled"
        if pooled and num_maps != num_foreground:
            raise ValueError("sr.exit_classifier: pooled needs one map per foreground class (the cam stage)")
        self.exits = nn.ModuleDict({
            level: ExitHead(channels[index], cfg.head_channels, num_maps, num_foreground, pooled)
            for index, level in enumerate(BACKBONE_LEVELS) if level in cfg.exits
        })
        # Without its own classifier (CAMNet) the main exit's logits are the GAP of its maps:
        # for CAMs that is exactly the network's logits, as the bias-free 1x1 classifier commutes with GAP.
        self.main_classifier = nn.Linear(num_maps, num_foreground) if main_classifier else nn.Identity()

    def forward(self, features: list[torch.Tensor], main_maps: torch.Tensor) -> list[Exit]:
        """All exits shallow -> deep, given the backbone's five feature maps and the main head's maps."""
        exits = [head(features[BACKBONE_LEVELS.index(level)]) for level, head in self.exits.items()]
        return exits + [(main_maps, self.main_classifier(main_maps.mean(dim=(2, 3))))]


def over_students(losses: list[torch.Tensor], reduction: str) -> torch.Tensor:
    stacked = torch.stack(losses)
    return stacked.sum() if reduction == "sum" else stacked.mean()


def class_detail_loss(teacher: torch.Tensor, students: list[torch.Tensor], form: str,
                      temperature: float, reduction: str = "mean") -> torch.Tensor:
    """Operation II with pixel labels: B x C x h x w maps, all of one size; per pixel the
    distribution over classes. Summed or averaged over the students (``reduction``)."""
    if form == "hard":
        # max's indices equal argmax's (the first maximum on ties); argmax over dim 1 of
        # B x C x H x W is about 15x slower on the CPU (docs/results.md, "Where a CPU training
        # step's time goes").
        target = teacher.max(dim=1).indices
        return over_students([F.cross_entropy(student, target) for student in students], reduction)
    return softened_kl(teacher, students, temperature, reduction)


def spatial_detail_loss(teacher: torch.Tensor, students: list[torch.Tensor], labels: torch.Tensor, form: str,
                        temperature: float, reduction: str = "mean",
                        gate: torch.Tensor | None = None) -> torch.Tensor:
    """Operation II on CAMs: B x K x h x w maps, all of one size; the distribution over the
    pixels of each (image, class) pair in the image label. Summed or averaged over the
    students; 0 (with a gradient path) when no image has a label. ``gate`` (hard form): the
    main CAM's maps; both distributions are then taken over its support alone (its pixels at
    or above its mean), and the teacher's support is its pixels there at or above its mean there."""
    present = labels > 0.5
    teacher, students = teacher[present].flatten(1), [student[present].flatten(1) for student in students]
    if len(teacher) == 0:
        return sum(student.sum() for student in students) * 0.0
    if form == "hard":
        inside = None if gate is None else above_mean(gate[present].flatten(1))
        support = above_mean(teacher, inside).float()
        target = support / support.sum(dim=1, keepdim=True)
        if inside is not None:
            # A large negative, not -inf, outside: kl_div's 0 * log(0) terms stay 0 rather than NaN.
            students = [student.masked_fill(~inside, -1e4) for student in students]
        return over_students([F.kl_div(F.log_softmax(student, dim=1), target, reduction="none")
                              .sum(dim=1).mean() for student in students], reduction)
    return softened_kl(teacher, students, temperature, reduction)


def above_mean(maps: torch.Tensor, inside: torch.Tensor | None = None) -> torch.Tensor:
    """N x P maps -> the pixels at or above each row's mean (over ``inside`` only, where given,
    and within it). The row's maximum is always kept, in case rounding puts the mean above it."""
    if inside is None:
        return maps >= torch.minimum(maps.mean(dim=1, keepdim=True), maps.amax(dim=1, keepdim=True))
    mean = (maps * inside).sum(dim=1, keepdim=True) / inside.sum(dim=1, keepdim=True)
    highest = maps.masked_fill(~inside, float("-inf")).amax(dim=1, keepdim=True)
    return (maps >= torch.minimum(mean, highest)) & inside


def softened_kl(teacher: torch.Tensor, students: list[torch.Tensor], temperature: float,
                reduction: str = "mean") -> torch.Tensor:
    """KL(teacher || student) of the softmaxes over dim 1 at ``temperature``, times T^2 (so the
    gradient scale does not depend on T), averaged over all other positions, then summed or
    averaged over the students."""
    target = F.log_softmax(teacher / temperature, dim=1)
    return over_students([
        F.kl_div(F.log_softmax(student / temperature, dim=1), target, reduction="none", log_target=True)
        .sum(dim=1).mean() for student in students
    ], reduction) * temperature ** 2


def context_loss(logits: list[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Operation III: the BCE of the shallower exits against the deepest exit's probabilities,
    summed or averaged over them."""
    teacher = torch.sigmoid(logits[-1]).detach()
    return over_students([F.binary_cross_entropy_with_logits(student, teacher) for student in logits[:-1]],
                         reduction)


def energy_detail_loss(features: list[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Operation II, class-agnostic (``detail_target: energy``): attention transfer (Zagoruyko
    and Komodakis, ICLR 2017) from the shallowest feature map to each deeper one. A map's
    attention is its channel mean of squares, flattened and L2-normalised; the teacher's
    (detached, area-pooled to each student's size) is compared with the student's by the squared
    L2 distance (between 0 and 4; the authors' mean of squares times beta/2 = 500 on CIFAR's
    32 x 32 maps is about half of it). Summed or averaged over the students."""
    energy = [f.pow(2).mean(dim=1, keepdim=True) for f in features]
    teacher = energy[0].detach()

    def distance(student: torch.Tensor) -> torch.Tensor:
        target = F.normalize(F.adaptive_avg_pool2d(teacher, student.shape[-2:]).flatten(1), dim=1)
        return (target - F.normalize(student.flatten(1), dim=1)).pow(2).sum(dim=1).mean()

    return over_students([distance(student) for student in energy[1:]], reduction)


def self_regulation_loss(exits: list[Exit], labels: torch.Tensor, cfg: SRConfig, epoch: int,
                         mask: torch.Tensor | None = None, input_size: tuple[int, int] | None = None,
                         features: list[torch.Tensor] | None = None) -> dict:
    """The SR loss terms of one batch, total under "loss".

    ``exits``: shallow -> deep, main last; ``labels``: B x (C-1) multi-hot image labels;
    ``mask``: B x H x W pixel labels (seg stage) or None (cam stage: the maps are CAMs);
    ``epoch``: 0-based, for the warm-up; ``input_size``: the images' size (default: the
    mask's), where ``detail_resolution: input`` compares the maps; ``features``: the backbone's
    maps at the exits' levels and the last one (``detail_target: energy``, cam stage).
    """
    maps, logits = [m for m, _ in exits], [z for _, z in exits]
    per_exit = [multilabel_loss(z, labels) for z in logits]
    cls = torch.stack(per_exit).sum()
    terms = {"cls": cls}
    if cfg.w_main_cls is None:
        total = cfg.w_cls * cls
    else:
        # As the docs' SR runs were made (commit 8b79a31): summing the auxiliary terms instead is
        # equal only up to float rounding, and those seeded runs would no longer repeat bit for bit.
        total = cfg.w_cls * (cls - per_exit[-1]) + cfg.w_main_cls * per_exit[-1]
    if mask is not None:
        seg = torch.stack([pixel_cross_entropy(resize(m, mask.shape[-2:]), mask) for m in maps]).sum()
        terms["seg"] = seg
        total = total + cfg.w_seg * seg
    if epoch >= cfg.warmup_epochs:
        if cfg.detail_target == "energy":
            if features is None:
                raise ValueError("sr.detail_target: energy needs the backbone's features (with_features)")
            terms["detail"] = energy_detail_loss(features, cfg.reduction)
        else:  # the exits' class maps, each upsampled to one size
            size = (maps[0].shape[-2:] if cfg.detail_resolution == "teacher"
                    else (input_size or mask.shape[-2:]))
            teacher = resize(maps[0].detach(), size)
            students = [resize(m, size) for m in maps[1:]]
            if mask is not None:
                terms["detail"] = class_detail_loss(teacher, students, cfg.form, cfg.temperature,
                                                    cfg.reduction)
            else:
                gate = resize(maps[-1].detach(), size) if cfg.detail_gate == "deep" else None
                terms["detail"] = spatial_detail_loss(teacher, students, labels, cfg.form, cfg.temperature,
                                                      cfg.reduction, gate)
        terms["context"] = context_loss(logits, cfg.reduction)
    else:
        terms["detail"] = terms["context"] = cls.new_zeros(())
    total = total + cfg.w_sf * terms["detail"] + cfg.w_sl * terms["context"]
    return {"loss": total} | terms


def cam_exit_mask_loss(maps: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Operation I's pixel term for the auxiliary exits of a CAM network, where pixel labels
    exist (a second cam round on the first round's pseudo masks): an exit's map of class k is
    trained per pixel, by binary cross-entropy, to say "class k" (``mask == k + 1``) over the
    labelled pixels (not 255), so that Operation II's teacher learns to localise as the
    authors' segmenter exits do. ``maps``: B x K x h x w foreground maps, any size; ``mask``:
    B x H x W labels 0..K (0 background) or 255. Summed over the exits; 0 (with a gradient
    path) where no pixel is labelled."""
    labelled = mask != IGNORE
    if not labelled.any():
        return sum(m.sum() for m in maps) * 0.0
    classes = maps[0].shape[1]
    one_hot = F.one_hot(torch.where(labelled, mask, 0).long(), classes + 1)
    target = one_hot[..., 1:].permute(0, 3, 1, 2).float()
    weight = labelled.unsqueeze(1).float()
    return torch.stack([
        (F.binary_cross_entropy_with_logits(resize(m, mask.shape[-2:]), target, reduction="none") * weight)
        .sum() / (weight.sum() * classes) for m in maps
    ]).sum()


def resize(maps: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize to ``size`` (h, w); the tensor itself when it already has that size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
