"""Mixed supervision: a few full masks plus weak labels, through a dual-branch teacher-student
segmenter ("Teach me to segment with mixed supervision: Confident students become masters",
Dolz, Desrosiers, Ben Ayed, IPMI 2021).

One shared encoder (the seg stage's backbone) feeds two decoders of the same structure (the
seg head) with no shared weights (:class:`pipeline.models.DeepLab` with ``teacher_head``):

* the teacher sees only the fully annotated images: cross-entropy against their full masks;
* the student sees every image through its weak labels: partial cross-entropy over the
  labelled pixels (a full image's weak labels are its weak version, so both branches see the
  same images), the full and the weak images' terms each averaged on its own and added, as
  the authors' code does (``partial_ce: sum``), or pooled over the batch (``partial_ce: pooled``);
* a KL term on the full images ties the two branches. Direction, form and scale follow the
  authors' code, because their weights (weight_KL 20 in their main.py) are calibrated to it:
  ``KL(student || teacher)`` of the softmax *outputs*, softened a second time
  (``softmax(softmax(z) / T)``), averaged over classes and pixels, times 0.5 T^2. The teacher
  is not detached, so the term moves both branches (``mixed.detach_teacher: true`` stops it at
  the teacher). Softening the outputs bounds the term (below 0.035 for four classes at T = 2);
  the textbook form, which softens the logits, is unbounded, and at the authors' weights it
  can outgrow every other term;
* the Shannon entropy of the student's softmax makes the student confident; the KL term
  keeps it from the trivial confident answer. Averaged over classes and pixels, as in the
  authors' code (their ``HLoss``), so ``w_entropy: 1`` weighs it as they do; over all the
  student's outputs, the full images' included, as their code does (``entropy_on: all``), or
  over the weak images only (``entropy_on: weak``).

``mixed.w_dmpls`` adds DMPLS's dynamically mixed pseudo labels (Luo et al., "Scribble-supervised
medical image segmentation via dual-branch network and dynamically mixed pseudo labels
supervision", MICCAI 2022), which this dual-branch network can take at no extra cost: on the weak
images, the argmax of ``beta p_student + (1 - beta) p_teacher`` (detached, beta uniform in (0, 1)
drawn each step) is a pseudo mask that both branches learn with the Dice loss: ``w_dmpls`` times
the mean of the two branches' Dice, so 0.25 per branch at DMPLS's 0.5 (HiLab-git/WSL4MIS @a594da8,
code/train_weakly_supervised_segmentation_pCE_ours_proposed.py lines 115-125: ``loss_ce + 0.5 *
loss_pse_sup``; its ``pDLoss``, code/utils/losses.py: squared denominators, every class the
background included, sums over the batch). DMPLS weighs each branch's partial cross-entropy 0.5;
here the student's stays at ``w_partial`` (0.1), so the pseudo labels weigh more against the
scribbles than in DMPLS. DMPLS's images are all scribbled; here the term sees the weak images'
pixels (in copy-paste steps, the pixels the weak images give the mixed inputs), so the teacher
learns from them too, and the full images keep their masks.

``mixed.copy_paste`` adds BCP's bidirectional copy-paste (Bai, Chen, Li, Shen, Wang, "Bidirectional
copy-paste for semi-supervised medical image segmentation", CVPR 2023; DeepMed-Lab-ECNU/BCP @7879f98,
code/ACDC_BCP_train.py, ``self_train``, lines 356-390). After the first ``start`` of the epochs (BCP
pre-trains a quarter of its iterations; here the loss above does), each step splits the batch's
full images F and weak images W into pairs and trains on two mixed inputs per pair instead of the
clean images: a weak image with a full image's box pasted in (BCP's ``net_input_unl``) and a full
image with a weak image's box (``net_input_l``), one box of 2/3 of each side per step
(``generate_mask``). An EMA of the network (decay ``ema``, started from the network's weights at
the first such step, as BCP loads the pre-trained network into it) predicts the clean weak images,
its student branch's argmax, each class's largest component with ``seg.largest_component`` (BCP's
``get_ACDC_masks(nms=1)``); the EMA forward runs in training mode, as BCP's. The student then
learns BCP's loss, ``seg.loss`` on the full masks' pixels plus ``u_weight`` times ``seg.loss`` on the
pseudo masks' pixels (BCP's ``mix_loss``; the two directions pooled, where BCP averages each and
halves their sum). The mixed-supervision terms stay, on the mixed inputs: the teacher on the full
masks' pixels, the partial cross-entropy on both images' weak labels (pooled), the KL term on the
pixels of full images, the entropy over every pixel. Where ours differs from BCP's code beyond
that: the Dice is ``seg.loss``'s (``cross_entropy_dice``: foreground classes, plain sums; none with
``cross_entropy``) where BCP's ``DiceLoss`` takes every class with squared denominators; a class's
components are 4-connected where BCP's ``skimage.measure.label`` joins diagonal neighbours; the
EMA and the student each run once on the concatenated images where BCP runs each half on its own
(BatchNorm's batch statistics differ); the weak images' padding (rare at acdc.yaml's crop) gets the
EMA's label, mostly background; and the steps after ``start`` go on from the current weights under
the poly learning rate, where BCP restarts its self-training from the best pre-trained network on
val at a constant rate.

``L = L_teacher + w_partial L_partial + w_kl L_KL + w_entropy L_entropy (+ w_dmpls L_DMPLS)
(+ L_BCP)``. With
``seg.sr.enabled`` the Self-Regulation loss of the student's exits, with the weak labels as
pixel labels, takes L_partial's place, as SR's loss takes the cross-entropy's place in the
other modes. Prediction uses the student (the paper's finding: the student surpasses the
teacher); the seg stage scores both.
"""
from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from pipeline.core.config import CopyPasteConfig, MixedConfig, SRConfig, TrainConfig
from pipeline.core.errors import ConfigError, DataError, TrainingError
from pipeline.core.io import file_digest
from pipeline.data.dataset import BACKGROUND, IGNORE, VOCDataset, image_size
from pipeline.data.labels import read_text
from pipeline.data.training_set import MaskFolder, TrainingSet
from pipeline.methods.components import largest_components
from pipeline.methods.losses import mask_loss, pixel_cross_entropy
from pipeline.methods.self_regulation import self_regulation_loss

SCRIBBLES = "Scribbles"  # beside SegmentationClass/: sparse labels, 255 = not scribbled


def read_id_list(path: Path, train_ids: list[str]) -> list[str]:
    """The ids of ``mixed.full_list``, each of which must be in the train split."""
    if not path.is_file():
        raise DataError(f"id list {path} does not exist (config key mixed.full_list)")
    ids = [line.strip() for line in read_text(path, 'one id per line').splitlines() if line.strip()]
    if not ids:
        raise DataError(f"id list {path} lists no ids (config key mixed.full_list)")
    known = set(train_ids)
    outside = [image_id for image_id in ids if image_id not in known]
    if outside:
        raise DataError(f"id list {path} names {outside[0]!r}, which is not in the train split")
    return sorted(set(ids))


def full_subset(train_ids: list[str], cfg: MixedConfig, seed: int) -> list[str]:
    """The train ids that keep their full mask: ``full_list``'s, or ``full_fraction`` of them
    drawn by ``seed`` (the same ids on every machine: NumPy's PCG64 is platform independent)."""
    if cfg.full_list is not None:
        return read_id_list(Path(cfg.full_list), train_ids)
    count = max(1, round(cfg.full_fraction * len(train_ids)))
    picked = np.random.default_rng(seed).choice(len(train_ids), size=count, replace=False)
    return [train_ids[i] for i in sorted(picked)]


def eroded_core(mask: np.ndarray, keep: float, erode_background: bool = False) -> np.ndarray:
    """The paper's weak labels from a full mask: each connected region of each foreground class
    shrunk to the ``keep`` share of its pixels farthest from its border (the image edge and
    unlabelled pixels count as border), never to nothing; everything else 255.

    The background stays unlabelled, as in the authors' code, whose partial cross-entropy
    reads only the foreground channel: the student learns the background from the KL term.
    ``erode_background`` gives it a core too, and then the cores are mostly background (95%
    on acdc-dev), and the ACDC student collapses to predicting background everywhere.
    """
    weak = np.full_like(mask, IGNORE)
    for cls in np.unique(mask):
        if cls == IGNORE or (cls == BACKGROUND and not erode_background):
            continue
        inside = np.pad(mask == cls, 1)
        depth = ndimage.distance_transform_edt(inside)[1:-1, 1:-1]
        regions, _ = ndimage.label(inside[1:-1, 1:-1])
        for index, box in enumerate(ndimage.find_objects(regions), start=1):
            region = regions[box] == index
            cutoff = np.quantile(depth[box][region], 1.0 - keep)
            weak[box][region & (depth[box] >= cutoff)] = cls
    return weak


class ErodedMasks:
    """Weak labels made by :func:`eroded_core` from the train masks (picklable, for loader workers)."""

    def __init__(self, dataset: VOCDataset, keep: float, erode_background: bool):
        self.dataset = dataset
        self.keep = keep
        self.erode_background = erode_background

    def __call__(self, image_id: str) -> np.ndarray:
        return eroded_core(self.dataset.load_train_mask(image_id), self.keep, self.erode_background)


class TeacherMasks:
    """The full masks of the full subset; every other image is all 255, so the teacher never
    sees a label of a weakly annotated image."""

    def __init__(self, dataset: VOCDataset, full_ids: list[str]):
        self.dataset = dataset
        self.full_ids = frozenset(full_ids)

    def __call__(self, image_id: str) -> np.ndarray:
        if image_id in self.full_ids:
            return self.dataset.load_train_mask(image_id)
        width, height = self.dataset.image_size(image_id)
        return np.full((height, width), IGNORE, np.uint8)


def weak_labels(cfg: MixedConfig, dataset: VOCDataset, pseudo_masks: MaskFolder):
    """The student's pixel labels, an id -> mask function (255 = unlabelled); ``pseudo_masks``
    is the refine stage's output, used with ``weak_source: pseudo``."""
    if cfg.weak_source == "pseudo":
        return pseudo_masks
    if cfg.weak_source == "scribble":
        return MaskFolder(dataset.root / SCRIBBLES)
    return ErodedMasks(dataset, cfg.erode_keep, cfg.erode_background)


class MixedTrainingSet(TrainingSet):
    """Training items with both label sets under one augmentation: ``mask`` (the teacher's:
    full masks, all 255 for weak images), ``weak_mask`` (the student's) and ``is_full``."""

    def __init__(self, dataset: VOCDataset, ids: list[str], full_ids: list[str], weak, augment: TrainConfig):
        super().__init__(dataset, ids, augment,
                         pixel_labels={"mask": TeacherMasks(dataset, full_ids), "weak_mask": weak})
        self.full_ids = frozenset(full_ids)

    def __getitem__(self, index: int) -> dict:
        return super().__getitem__(index) | {"is_full": torch.tensor(self.ids[index] in self.full_ids)}


class MixedBatchSampler:
    """Batches of a fixed composition: ``n_full`` full-subset images and the rest weakly
    annotated ones, ``weak_per_full`` weak per full image (rounded; at least one full image).
    Each kind is drawn without replacement from its own pool, reshuffled when used up, so the
    small full subset cycles many times an epoch. An epoch is ``len(all ids) // batch_size``
    steps, as in the other modes, so every mode trains the same number of steps.
    (Under DistributedDataParallel each process would hold one, seeded per rank.)"""

    def __init__(self, full_indices: list[int], weak_indices: list[int], batch_size: int, weak_per_full: int,
                 generator: torch.Generator):
        if weak_per_full == 0 or not weak_indices:
            self.n_full = batch_size
        else:
            self.n_full = min(batch_size - 1, max(1, round(batch_size / (1 + weak_per_full))))
        self.n_weak = batch_size - self.n_full
        self.steps = (len(full_indices) + len(weak_indices)) // batch_size
        self.pools = [(full_indices, []), (weak_indices, [])]
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def _take(self, pool, count: int) -> list[int]:
        indices, queue = pool
        taken = []
        while len(taken) < count:
            if not queue:
                order = torch.randperm(len(indices), generator=self.generator).tolist()
                queue.extend(indices[i] for i in order)
            taken.append(queue.pop())
        return taken

    def __iter__(self):
        for _ in range(self.steps):
            yield self._take(self.pools[0], self.n_full) + self._take(self.pools[1], self.n_weak)

    def state_dict(self) -> dict:
        """The queues left over from the last epoch (a resumed training goes on with them)."""
        return {"queues": [list(queue) for _, queue in self.pools]}

    def load_state_dict(self, state: dict) -> None:
        for (_, queue), saved in zip(self.pools, state["queues"]):
            queue[:] = saved


def teacher_student_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float,
                       detach_teacher: bool, pixels: torch.Tensor | None = None) -> torch.Tensor:
    """The authors' distillation term: KL(student || teacher) between ``softmax(p / T)`` of each
    branch's softmax output ``p``, averaged over classes and pixels (those of the boolean
    ``pixels`` (B, H, W) where given), times 0.5 T^2 (their ``KLDivLoss`` with its default mean
    reduction); 0 (with a gradient path) for an empty batch."""
    if teacher.numel() == 0:
        return (teacher.sum() + student.sum()) * 0.0
    if detach_teacher:
        teacher = teacher.detach()
    log_student = F.log_softmax(F.softmax(student, dim=1) / temperature, dim=1)
    log_teacher = F.log_softmax(F.softmax(teacher, dim=1) / temperature, dim=1)
    per_class = log_student.exp() * (log_student - log_teacher)
    kl = per_class.mean() if pixels is None else per_class.mean(dim=1)[pixels].mean()
    return kl * 0.5 * temperature ** 2


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax over dim 1, averaged over classes and pixels (the authors'
    ``HLoss``: log(C) / C for a uniform prediction); 0 for an empty batch."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).mean()


def squared_dice_loss(probs: torch.Tensor, target: torch.Tensor, pixels: torch.Tensor | None = None,
                      smooth: float = 1e-5) -> torch.Tensor:
    """WSL4MIS's ``pDLoss`` (code/utils/losses.py): 1 - the mean over every class, the background
    included, of ``(2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s)``, summed over the whole batch, over
    the boolean ``pixels`` (B, H, W) only where given (its ignore mask); ``probs`` are softmax
    outputs, ``target`` class indices."""
    one_hot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    if pixels is not None:
        probs, one_hot = probs * pixels[:, None], one_hot * pixels[:, None]
    dims = (0, 2, 3)
    overlap = (probs * one_hot).sum(dims)
    dice = (2 * overlap + smooth) / ((probs * probs).sum(dims) + one_hot.sum(dims) + smooth)
    return 1 - dice.mean()


def mixed_pseudo_label_loss(student: torch.Tensor, teacher: torch.Tensor,
                            pixels: torch.Tensor | None = None) -> torch.Tensor:
    """DMPLS's pseudo supervision: both branches' Dice against the argmax of a random mix of their
    detached softmax outputs, 0.5 each (``beta = random.random() + 1e-10`` in their code), over the
    boolean ``pixels`` only where given; 0 for an empty batch."""
    if student.numel() == 0:
        return (student.sum() + teacher.sum()) * 0.0
    p_student, p_teacher = F.softmax(student, dim=1), F.softmax(teacher, dim=1)
    beta = torch.rand(()).item() + 1e-10
    pseudo = (beta * p_student + (1.0 - beta) * p_teacher).detach().argmax(dim=1)
    return 0.5 * (squared_dice_loss(p_student, pseudo, pixels)
                  + squared_dice_loss(p_teacher, pseudo, pixels))


class EMANetwork(nn.Module):
    """BCP's EMA teacher (``update_model_ema``): a copy of the network whose every floating-point
    entry of the state dict becomes ``decay`` of its own plus ``1 - decay`` of the network's at each
    step, the first time a plain copy. A submodule of the network it follows, so that the training
    checkpoint holds it and a resumed run goes on with it; ``model.pt`` leaves it out."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = copy.deepcopy(network).requires_grad_(False)
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def follow(self, network: nn.Module, decay: float) -> None:
        source, started = network.state_dict(), bool(self.started)
        for key, value in self.network.state_dict().items():
            if started and value.is_floating_point():
                value.mul_(decay).add_(source[key], alpha=1.0 - decay)
            else:
                value.copy_(source[key])
        self.started.fill_(True)


def box_inside(height: int, width: int, device: torch.device) -> torch.Tensor:
    """BCP's ``generate_mask``: True inside a box of int(2/3) of each side at a random place."""
    box_h, box_w = int(height * 2 / 3), int(width * 2 / 3)
    top = int(torch.randint(0, height - box_h, ()).item())
    left = int(torch.randint(0, width - box_w, ()).item())
    inside = torch.zeros(height, width, dtype=torch.bool, device=device)
    inside[top:top + box_h, left:left + box_w] = True
    return inside


def ema_pseudo_masks(ema: EMANetwork, images: torch.Tensor, largest_component: bool) -> torch.Tensor:
    """The EMA student's argmax on ``images``, each class cut to its largest 2-D component
    with ``largest_component`` (BCP's ``get_ACDC_masks(nms=1)``)."""
    with torch.no_grad():
        labels = ema.network(images).argmax(dim=1)
    if largest_component:
        kept = np.stack([largest_components(mask) for mask in labels.cpu().numpy()])
        labels = torch.from_numpy(kept).to(labels.device)
    return labels


def paired_indices(is_full: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """BCP's sub-batches: the first and second halves of the full images and of the weak ones
    (``img_a``, ``img_b``, ``uimg_a``, ``uimg_b``), as many pairs in each as both kinds allow."""
    full_index, weak_index = is_full.nonzero()[:, 0], (~is_full).nonzero()[:, 0]
    pairs = min(len(full_index), len(weak_index)) // 2
    if pairs == 0:  # under torchrun, a process's share of a small batch
        raise TrainingError(f"copy-paste needs two full and two weak images in each process's share of a "
                            f"batch; this one has {len(full_index)} and {len(weak_index)}: raise "
                            "seg.train.batch_size")
    return (full_index[:pairs], full_index[pairs:2 * pairs],
            weak_index[:pairs], weak_index[pairs:2 * pairs])


def paste_pairs(batch: dict, pseudo: torch.Tensor, inside: torch.Tensor, indices: tuple) -> dict:
    """BCP's mixed inputs and their labels: for each pair of ``indices`` (:func:`paired_indices`),
    a weak image with a full image's box (``net_input_unl``), then a full image with a weak image's
    box (``net_input_l``); ``pseudo`` holds the pseudo masks of the weak images, a's then b's;
    ``inside`` is the box. The labels: ``full_masks`` (the full masks where full images are, 255
    elsewhere), ``pseudo_masks`` (the reverse), ``weak_masks`` (both images' weak labels) and
    ``from_full``."""
    full_a, full_b, weak_a, weak_b = indices
    pairs = len(full_a)
    image, mask, weak = batch["image"], batch["mask"], batch["weak_mask"]

    def paste(outer: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        return torch.where(inside, box, outer)

    unlabelled = torch.full_like(mask[full_a], IGNORE)
    return {
        "images": torch.cat([paste(image[weak_a], image[full_a]), paste(image[full_b], image[weak_b])]),
        "full_masks": torch.cat([paste(unlabelled, mask[full_a]), paste(mask[full_b], unlabelled)]),
        "pseudo_masks": torch.cat([paste(pseudo[:pairs], unlabelled), paste(unlabelled, pseudo[pairs:])]),
        "weak_masks": torch.cat([paste(weak[weak_a], weak[full_a]), paste(weak[full_b], weak[weak_b])]),
        "from_full": torch.cat([inside.expand(pairs, -1, -1), (~inside).expand(pairs, -1, -1)]),
    }


def copy_paste_loss(model, batch: dict, cfg: MixedConfig, teacher_loss: str, largest_component: bool) -> dict:
    """One BCP step (module docstring): two mixed inputs per pair of full and weak images."""
    network = getattr(model, "model", model)  # under torchrun, the module inside the DDP wrapper
    network.ema.follow(network, cfg.copy_paste.ema)
    image, indices = batch["image"], paired_indices(batch["is_full"])
    pseudo = ema_pseudo_masks(network.ema, image[torch.cat(indices[2:])], largest_component)
    mixed = paste_pairs(batch, pseudo, box_inside(image.shape[-2], image.shape[-1], image.device), indices)
    branches = model.forward_branches(mixed["images"], with_exits=False)
    teacher, student, full_masks = branches["teacher"], branches["student"], mixed["full_masks"]
    terms = {
        "teacher": mask_loss(teacher, full_masks, teacher_loss),
        "partial": pixel_cross_entropy(student, mixed["weak_masks"]),
        "kl": teacher_student_kl(teacher, student, cfg.temperature, cfg.detach_teacher,
                                 pixels=mixed["from_full"]),
        "entropy": mean_entropy(student),
        "copy_paste": (mask_loss(student, full_masks, teacher_loss)
                       + cfg.copy_paste.u_weight * mask_loss(student, mixed["pseudo_masks"], teacher_loss)),
    }
    # DMPLS on the pixels the weak images give
    return weighted_total(terms, cfg, lambda: mixed_pseudo_label_loss(student, teacher, ~mixed["from_full"]))


def weighted_total(terms: dict, cfg: MixedConfig, dmpls) -> dict:
    """``terms`` and their total under "loss": ``L_teacher + w_partial L_partial + w_kl L_KL +
    w_entropy L_entropy``, plus BCP's term where there is one, plus ``w_dmpls`` times ``dmpls()``,
    which is called only when w_dmpls is on, so that runs without DMPLS draw nothing."""
    total = (terms["teacher"] + cfg.w_partial * terms["partial"] + cfg.w_kl * terms["kl"]
             + cfg.w_entropy * terms["entropy"])
    if "copy_paste" in terms:
        total = total + terms["copy_paste"]
    if cfg.w_dmpls:
        terms["dmpls"] = dmpls()
        total = total + cfg.w_dmpls * terms["dmpls"]
    return {"loss": total} | terms


def copy_paste_start_epoch(cfg: CopyPasteConfig, num_epochs: int) -> int | None:
    """The first epoch (0-based) of BCP's steps, the start share of the epochs rounded down, or
    None when copy-paste is off."""
    return math.floor(cfg.start * num_epochs) if cfg.enabled else None


def check_copy_paste_shares(full_per_batch: int, weak_per_batch: int, processes: int) -> None:
    """Before training: each process's share of a batch (every processes-th image) must hold two
    full and two weak images, or copy-paste has no pair to paste."""
    if min(full_per_batch, weak_per_batch) // processes < 2:
        raise ConfigError(f"config key 'mixed.copy_paste.enabled' needs two full and two weak images in each "
                          f"process's share of a batch; its batches hold {full_per_batch} full and "
                          f"{weak_per_batch} weak images for {processes} process(es): raise "
                          "seg.train.batch_size, or keep weak images (mixed.full_fraction below 1)")


def mixed_supervision_loss(model, batch: dict, epoch: int, cfg: MixedConfig, sr: SRConfig,
                           teacher_loss: str = "cross_entropy", copy_paste_from: int | None = None,
                           largest_component: bool = False) -> dict:
    """The loss of one step; BCP's from epoch ``copy_paste_from`` on (with mixed.copy_paste)."""
    if copy_paste_from is not None and epoch >= copy_paste_from:
        return copy_paste_loss(model, batch, cfg, teacher_loss, largest_component)
    branches = model.forward_branches(batch["image"], with_exits=sr.enabled)
    teacher, student, full = branches["teacher"], branches["student"], batch["is_full"]
    weak = batch["weak_mask"]
    if sr.enabled:
        partial = self_regulation_loss(branches["exits"], batch["labels"], sr, epoch, mask=weak)["loss"]
    elif cfg.partial_ce == "sum":
        partial = (pixel_cross_entropy(student[full], weak[full])
                   + pixel_cross_entropy(student[~full], weak[~full]))
    else:
        partial = pixel_cross_entropy(student, weak)
    # The authors' eloss sees each full image three times (their input is full, full, weak).
    if cfg.entropy_on == "all":
        entropy_outputs = torch.cat([student[full]] * 3 + [student[~full]])
    else:
        entropy_outputs = student[~full]
    terms = {
        "teacher": mask_loss(teacher, batch["mask"], teacher_loss),
        "partial": partial,
        "kl": teacher_student_kl(teacher[full], student[full], cfg.temperature, cfg.detach_teacher),
        "entropy": mean_entropy(entropy_outputs),
    }
    return weighted_total(terms, cfg, lambda: mixed_pseudo_label_loss(student[~full], teacher[~full]))


def mixed_fingerprint(cfg, dataset: VOCDataset) -> str:
    """Identifies mixed mode's own data for seg's cache key: the full subset's ids (so a
    changed full_list file counts) and, for scribbles, the scribble files' contents."""
    train_ids = dataset.split_ids(cfg.data.train_split)
    digest = hashlib.sha256(",".join(full_subset(train_ids, cfg.mixed, cfg.seed)).encode())
    if cfg.mixed.weak_source == "scribble":
        for image_id in train_ids:
            digest.update(f"{image_id}:{file_digest(scribble_path(dataset, image_id))}".encode())
    return digest.hexdigest()[:16]


def scribble_path(dataset: VOCDataset, image_id: str) -> Path:
    """The scribble file of an id, checked: present, the size of its image (a different
    size would be silently resized with the image during training), and class indices only."""
    path = dataset.root / SCRIBBLES / f"{image_id}.png"
    if not path.is_file():
        raise DataError(f"id {image_id!r} has no scribbles {path} (mixed.weak_source: scribble)")
    scribble_size, size = image_size(path), dataset.image_size(image_id)
    if scribble_size != size:
        raise DataError(f"scribbles {path} are {scribble_size[0]}x{scribble_size[1]} "
                        f"but the image is {size[0]}x{size[1]}")
    dataset.checked_values(path)
    return path
