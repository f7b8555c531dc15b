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
images, the argmax of ``beta p_student + (1 - beta) p_teacher`` (detached, beta uniform in (0, 1]
drawn each step) is a pseudo mask that both branches learn with the Dice loss, weighted 0.5 per
branch (HiLab-git/WSL4MIS @a594da8, code/train_weakly_supervised_segmentation_pCE_ours_proposed.py
lines 115-125: ``loss_ce + 0.5 * loss_pse_sup``; its ``pDLoss``, code/utils/losses.py, with no pixel
ignored: squared denominators, every class the background included, sums over the batch).
DMPLS's images are all scribbled; here the term sees the weak images, so the teacher learns from
them too, and the full images keep their masks.

``L = L_teacher + w_partial L_partial + w_kl L_KL + w_entropy L_entropy (+ w_dmpls L_DMPLS)``. With
``seg.sr.enabled`` the Self-Regulation loss of the student's exits, with the weak labels as
pixel labels, takes L_partial's place, as SR's loss takes the cross-entropy's place in the
other modes. Prediction uses the student (the paper's finding: the student surpasses the
teacher); the seg stage scores both.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipeline.core.config import MixedConfig, SRConfig
from pipeline.core.errors import DataError
from pipeline.core.io import file_digest
from pipeline.data.dataset import BACKGROUND, IGNORE, VOCDataset, image_size
from pipeline.data.labels import read_text
from pipeline.data.training_set import MaskFolder, TrainingSet
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

    def __init__(self, dataset: VOCDataset, ids: list[str], full_ids: list[str], weak, crop_size: int,
                 scale_range: list[float], color_jitter: list[float] | None = None, rotation: float = 0.0):
        super().__init__(dataset, ids, crop_size, scale_range,
                         pixel_labels={"mask": TeacherMasks(dataset, full_ids), "weak_mask": weak},
                         color_jitter=color_jitter, rotation=rotation)
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
                       detach_teacher: bool) -> torch.Tensor:
    """The authors' distillation term: KL(student || teacher) between ``softmax(p / T)`` of each
    branch's softmax output ``p``, averaged over classes and pixels, times 0.5 T^2 (their
    ``KLDivLoss`` with its default mean reduction); 0 (with a gradient path) for an empty batch."""
    if teacher.numel() == 0:
        return (teacher.sum() + student.sum()) * 0.0
    if detach_teacher:
        teacher = teacher.detach()
    log_student = F.log_softmax(F.softmax(student, dim=1) / temperature, dim=1)
    log_teacher = F.log_softmax(F.softmax(teacher, dim=1) / temperature, dim=1)
    kl = (log_student.exp() * (log_student - log_teacher)).mean()
    return kl * 0.5 * temperature ** 2


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax over dim 1, averaged over classes and pixels (the authors'
    ``HLoss``: log(C) / C for a uniform prediction); 0 for an empty batch."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).mean()


def squared_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """WSL4MIS's ``pDLoss`` with no pixel ignored (code/utils/losses.py): 1 - the mean over every
    class, the background included, of ``(2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s)``, summed over the
    whole batch; ``probs`` are softmax outputs, ``target`` class indices."""
    one_hot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    overlap = (probs * one_hot).sum(dims)
    dice = (2 * overlap + smooth) / ((probs * probs).sum(dims) + one_hot.sum(dims) + smooth)
    return 1 - dice.mean()


def mixed_pseudo_label_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DMPLS's pseudo supervision: both branches' Dice against the argmax of a random mix of their
    detached softmax outputs, 0.5 each (``beta = random.random() + 1e-10`` in their code); 0 for an
    empty batch."""
    if student.numel() == 0:
        return (student.sum() + teacher.sum()) * 0.0
    p_student, p_teacher = F.softmax(student, dim=1), F.softmax(teacher, dim=1)
    beta = torch.rand(()).item() + 1e-10
    pseudo = (beta * p_student + (1.0 - beta) * p_teacher).detach().argmax(dim=1)
    return 0.5 * (squared_dice_loss(p_student, pseudo) + squared_dice_loss(p_teacher, pseudo))


def mixed_supervision_loss(model, batch: dict, epoch: int, cfg: MixedConfig, sr: SRConfig,
                           teacher_loss: str = "cross_entropy") -> dict:
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
    total = (terms["teacher"] + cfg.w_partial * partial + cfg.w_kl * terms["kl"]
             + cfg.w_entropy * terms["entropy"])
    if cfg.w_dmpls:  # no draw at all when off, so runs without it keep their random stream
        terms["dmpls"] = mixed_pseudo_label_loss(student[~full], teacher[~full])
        total = total + cfg.w_dmpls * terms["dmpls"]
    return {"loss": total} | terms


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
