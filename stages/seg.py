"""Stage seg: train a DeepLab segmenter on pixel labels, predict and score the val split.

The pixel labels are the refine stage's pseudo masks in weak mode (255 = unsure,
ignored by the loss) and the ground-truth masks in full mode (the upper bound). In mixed
mode a teacher branch learns from the full masks of a few images and a student branch
from everyone's weak labels (pipeline/mixed.py); the student predicts, both are scored.
Outputs in ``<run-dir>/seg/``: ``model.pt``, ``classes.txt``, ``predictions/<id>.png`` (every
val id; none without a val split) and ``metrics.json`` (IoU, Dice, HD95 on the val ids with
a mask); mixed mode adds ``predictions_teacher/`` and ``full_ids.txt``.
With ``seg.sr.enabled`` the segmenter trains with Self-Regulation exits
(pipeline/self_regulation.py); prediction runs the main path alone.
"""
from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.cache import (
    CHECKPOINT,
    SCORING_DATA_KEYS,
    StageOutput,
    config_values,
    read_json,
    round_checkpoint,
    section_for_cache,
    upstream_keys,
)
from pipeline.core.config import Config, CrfConfig, SRConfig
from pipeline.core.errors import DataError
from pipeline.core.io import (
    atomic_write_bytes,
    atomic_write_json,
    file_digest,
    load_mask,
    save_mask,
)
from pipeline.core.metrics import SegmentationScores, confusion_matrix, iou_scores, not_scored
from pipeline.core.runtime import (
    barrier,
    is_main_process,
    seed_everything,
    select_device,
    shard,
    sum_across_ranks,
    world_size,
)
from pipeline.core.training import (
    LossFn,
    epochs,
    load_checkpoint,
    loss_curve,
    make_train_loader,
    save_checkpoint,
    train,
)
from pipeline.data.dataset import VOCDataset, open_dataset, score_ids, score_split
from pipeline.data.training_set import MaskFolder, TrainingSet, normalize
from pipeline.data.volumes import Volumes
from pipeline.methods.components import keep_largest_components
from pipeline.methods.losses import mask_loss
from pipeline.methods.mixed import (
    MixedBatchSampler,
    MixedTrainingSet,
    check_copy_paste_shares,
    copy_paste_start_epoch,
    full_subset,
    mixed_fingerprint,
    mixed_supervision_loss,
    weak_labels,
)
from pipeline.methods.self_regulation import self_regulation_loss
from pipeline.methods.self_training import predict_pseudo_masks
from pipeline.models.backbones import weights_fingerprint
from pipeline.models.networks import DeepLab, predict_batch, predict_with_crf, segmentation_network

NAME = "seg"
# The cache version: raised when a release changes what seg computes from the same config and
# data, so that caches made before are stale once (README, "Outputs and the cache"). 2: the loss
# on pixel masks became a key (seg.loss) and the largest component a scoring key.
VERSION = 2
CLASSES = "classes.txt"  # the class names, beside model.pt: `run_pipeline.py predict` needs no data folder


def uses_pseudo_masks(cfg: Config) -> bool:
    return cfg.mode == "weak" or (cfg.mode == "mixed" and cfg.mixed.weak_source == "pseudo")


def upstream(cfg: Config) -> list[str]:
    return ["refine"] if uses_pseudo_masks(cfg) else []


def own_inputs(cfg: Config) -> dict:
    """The network depends on the train split and its labels; the val split, how it is
    predicted (flip) and scored (volumes, spacing) is the scoring part: changing only that
    predicts and scores again with the cached network."""
    dataset = open_dataset(cfg.data)
    mixed = cfg.mode == "mixed"
    spacing_file = Path(cfg.data.root) / cfg.data.spacing_file if cfg.data.spacing_file else None
    self_training = cfg.mode == "weak" and cfg.seg.self_training.enabled
    # With copy-paste the largest component also cuts the EMA's pseudo masks: a training key then.
    copy_paste = mixed and cfg.mixed.copy_paste.enabled
    scoring_keys = (("data.val_split", "data.volume_pattern", "data.spacing", "data.spacing_file",
                     "seg.crf_predict") + (() if copy_paste else ("seg.largest_component",))
                    # Self-training predicts the next masks with the flip: then it is part of training,
                    # and the rounds' masks are scored on the score split.
                    + (("data.score_split",) if self_training else ("seg.flip_predict",))
                    + (("refine.crf",) if cfg.seg.crf_predict else ()))
    scored_splits = [cfg.data.val_split] + ([score_split(cfg.data)] if self_training else [])
    # Self-training is weak mode's alone: the other modes neither use nor depend on it.
    unused = () if cfg.mode == "weak" else ("seg.self_training",)
    return {"version": VERSION,
            "config": section_for_cache(cfg, "seed", "mode", "data", "seg", *(["mixed"] if mixed else []),
                                        omit=SCORING_DATA_KEYS + scoring_keys + unused),
            "data_fingerprint": dataset.fingerprint(cfg.data.train_split),
            "weights_fingerprint": weights_fingerprint(cfg.seg.backbone, "seg.backbone.weights")} | (
        {"mixed_fingerprint": mixed_fingerprint(cfg, dataset)} if mixed else {}) | {
        "scoring": {"config": config_values(cfg, *scoring_keys),
                    "data_fingerprint": dataset.fingerprint(scored_splits=scored_splits) + (
                        f":{file_digest(spacing_file)}" if spacing_file else "")}}


def check_training_masks(cfg: Config, dataset: VOCDataset) -> None:
    """Full and mixed mode train on masks: every image they train on must have one (weak mode
    needs none). A one-line DataError before any work names how many are missing."""
    train_ids = dataset.split_ids(cfg.data.train_split)
    if cfg.mode == "full" or (cfg.mode == "mixed" and cfg.mixed.weak_source == "erode"):
        needed = train_ids
    elif cfg.mode == "mixed":
        needed = full_subset(train_ids, cfg.mixed, cfg.seed)
    else:
        return
    missing = [image_id for image_id in needed if not dataset.has_mask(image_id, cfg.data.train_masks)]
    if missing:
        raise DataError(f"--mode {cfg.mode} trains on masks, but {len(missing)} of the {len(needed)} "
                        f"images it trains on have none in {dataset.root / cfg.data.train_masks}/, e.g. "
                        f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")


def segmentation_loss(model, batch, epoch, kind: str = "cross_entropy") -> dict:
    return {"loss": mask_loss(model(batch["image"]), batch["mask"], kind)}


def sr_segmentation_loss(model, batch, epoch, sr: SRConfig) -> dict:
    """Self-Regulation with the pixel labels; the image labels are the data set's (the tags in weak mode)."""
    return self_regulation_loss(model.forward_exits(batch["image"]), batch["labels"], sr, epoch,
                                mask=batch["mask"])


def training_loss(sr: SRConfig, loss: str = "cross_entropy") -> LossFn:
    """``loss`` (``seg.loss``) on the masks, or the Self-Regulation loss when ``sr.enabled``."""
    if sr.enabled:
        return functools.partial(sr_segmentation_loss, sr=sr)
    return functools.partial(segmentation_loss, kind=loss)


def training_loader(cfg: Config, dataset: VOCDataset, pseudo_folder: Path, generator: torch.Generator,
                    full_ids: list[str]):
    train_ids = dataset.split_ids(cfg.data.train_split)
    pseudo_masks = MaskFolder(pseudo_folder)
    if cfg.mode == "mixed":
        train_set = MixedTrainingSet(dataset, train_ids, full_ids,
                                     weak_labels(cfg.mixed, dataset, pseudo_masks), cfg.seg.train)
        full = set(full_ids)
        sampler = MixedBatchSampler([i for i, x in enumerate(train_ids) if x in full],
                                    [i for i, x in enumerate(train_ids) if x not in full],
                                    cfg.seg.train.batch_size, cfg.mixed.weak_per_full, generator)
        if cfg.mixed.copy_paste.enabled:
            check_copy_paste_shares(sampler.n_full, sampler.n_weak, world_size())
        return make_train_loader(train_set, cfg.seg.train, cfg.data.loader_workers, generator,
                                 batch_sampler=sampler)
    labels = pseudo_masks if cfg.mode == "weak" else dataset.load_train_mask
    train_set = TrainingSet(dataset, train_ids, cfg.seg.train, pixel_labels={"mask": labels})
    return make_train_loader(train_set, cfg.seg.train, cfg.data.loader_workers, generator)


def branches(model: DeepLab) -> dict:
    """The model's prediction branches by output folder: ``predictions`` (the student, in
    mixed mode) and, for a mixed model, ``predictions_teacher``."""
    return {"predictions": model.forward} | (
        {"predictions_teacher": model.forward_teacher} if model.teacher_head is not None else {})


def predict_and_score(model: DeepLab, dataset: VOCDataset, ids: list[str], flip: bool, device: torch.device,
                      out_dir: Path | None, volumes: Volumes | None = None,
                      resume: bool = False, share: bool = True,
                      crf: CrfConfig | None = None, largest_component: bool = False
                      ) -> dict[str, SegmentationScores]:
    """Predictions of ``ids`` (with ``share``, this process's share of them) per branch, scored
    against the masks of the ids that have one (and per 3-D volume with ``volumes``). With
    ``out_dir`` each branch's masks are also written to the folder of that name; ``resume``
    reads back the ones there. With ``crf`` each prediction goes through the dense CRF. With
    ``largest_component`` each class keeps its largest component per volume (or image): that
    needs every slice of a volume, so a process predicting only its share writes them as
    predicted, and the pass over the whole split (``share`` false) post-processes them."""
    forwards = branches(model)
    if volumes is not None:
        volumes = volumes.complete(ids, dataset)
    spacing = volumes.spacing(dataset.with_masks(ids)) if volumes is not None else None
    scores = {folder: SegmentationScores(dataset.classes, volumes, spacing) for folder in forwards}
    if out_dir is not None:
        for folder in forwards:
            (out_dir / folder).mkdir(exist_ok=True)  # a new partial folder is empty; torchrun: every process
    post_process = largest_component and not (share and world_size() > 1)
    held = {folder: {} for folder in forwards}  # post_process: every prediction, until the last
    model.eval()
    for image_id in tqdm(shard(ids) if share else ids, desc="seg prediction", leave=False,
                         disable=not is_main_process()):
        gt = dataset.load_mask(image_id) if dataset.has_mask(image_id) and not post_process else None
        rgb = image = None
        for folder, forward in forwards.items():
            written = out_dir / folder / f"{image_id}.png" if out_dir is not None else None
            # Complete: written atomically before a kill. Post-processing again what a killed run
            # wrote post-processed keeps it: a class's one component stays the largest.
            if resume and written is not None and written.is_file():
                mask = load_mask(written)
            else:
                if image is None:
                    rgb = dataset.load_image(image_id)
                    image = normalize(rgb).to(device)
                if crf is not None:
                    mask = predict_with_crf(forward, image, rgb, flip, crf)
                else:
                    (mask,) = predict_batch(forward, [image], flip)
                if written is not None and not post_process:
                    save_mask(written, mask)
            if post_process:
                held[folder][image_id] = mask
            elif gt is not None:
                scores[folder].add(gt, mask, image_id)
    for folder, masks in held.items():
        for image_id, mask in keep_largest_components(masks, volumes).items():
            if out_dir is not None and is_main_process():
                save_mask(out_dir / folder / f"{image_id}.png", mask)
            if dataset.has_mask(image_id):
                scores[folder].add(dataset.load_mask(image_id), mask, image_id)
    return scores


def scored(scores: SegmentationScores, reason: str) -> dict:
    return scores.result() if scores.images else not_scored(reason)


def train_network(cfg: Config, dataset: VOCDataset, pseudo_folder: Path, generator: torch.Generator,
                  full_ids: list[str], device: torch.device, checkpoint: Path, desc: str):
    """A new segmenter trained as ``cfg`` says, on ``pseudo_folder``'s masks in weak mode; the
    network and its losses per epoch."""
    model = segmentation_network(cfg, dataset.num_classes, training=True).to(device)
    loader = training_loader(cfg, dataset, pseudo_folder, generator, full_ids)
    compute_loss = (functools.partial(mixed_supervision_loss, cfg=cfg.mixed, sr=cfg.seg.sr,
                                      teacher_loss=cfg.seg.loss,
                                      copy_paste_from=copy_paste_start_epoch(cfg.mixed.copy_paste,
                                                                             epochs(cfg.seg.train, loader)),
                                      largest_component=cfg.seg.largest_component)
                    if cfg.mode == "mixed" else training_loss(cfg.seg.sr, cfg.seg.loss))
    history = train(model, loader, compute_loss, cfg.seg.train, device, desc, checkpoint)
    return model, loss_curve(history)


def self_training_rounds(cfg: Config, dataset: VOCDataset, run_dir: Path, out: StageOutput,
                         device: torch.device) -> tuple[Path, list[dict]]:
    """Every network before the last (seg.self_training): round r trains on the previous round's
    masks (round 0 on refine's), predicts the train split into ``round-<r>/pseudo/`` and is scored
    on those masks (train) and on the val split. A round whose ``round.json`` is written is done
    and is skipped on resume. Returns the last round's masks and the rounds' metrics."""
    pseudo, rounds = run_dir / "refine" / "pseudo", []
    train_ids, val_ids = dataset.split_ids(cfg.data.train_split), dataset.split_ids(cfg.data.val_split)
    masked = set(score_ids(cfg.data, dataset))
    crf = cfg.refine.crf if cfg.seg.self_training.crf else None
    for index in range(cfg.seg.self_training.rounds):
        folder = out.dir / f"round-{index}"
        record = read_json(folder / "round.json") if out.resumed else None
        if record is None:
            # Seeded per round, so that a round after a skipped one starts as it would have.
            generator = seed_everything(cfg.seed + index)
            model, losses = train_network(cfg, dataset, pseudo, generator, [], device,
                                          out.dir / round_checkpoint(index), f"seg (weak, round {index})")
            model.eval()
            confusion = sum_across_ranks(predict_pseudo_masks(
                model.forward, dataset, train_ids, folder / "pseudo", cfg.seg.flip_predict, crf, device,
                masked, out.resumed))
            barrier()
            volumes = Volumes(cfg.data, dataset.root) if cfg.data.volume_pattern else None
            val = predict_and_score(model, dataset, val_ids, cfg.seg.flip_predict, device, None, volumes,
                                    share=False, crf=cfg.refine.crf if cfg.seg.crf_predict else None,
                                    largest_component=cfg.seg.largest_component)
            record = {"round": index, "train_loss_by_epoch": losses,
                      "pseudo_masks": (iou_scores(confusion, dataset.classes) if masked
                                       else not_scored("no masks")),
                      "val": scored(val["predictions"], "no masks" if val_ids else "no val split")}
            if is_main_process():
                atomic_write_json(folder / "round.json", record)
            barrier()
            del model  # the next round's network trains from scratch
        rounds.append(record)
        pseudo = folder / "pseudo"
    return pseudo, rounds


def rescored_rounds(cfg: Config, dataset: VOCDataset, out: StageOutput) -> list[dict]:
    """The rounds' records when only the scoring changed: their masks are scored again from the
    files; their networks are not kept, so their val scores are dropped."""
    masked, rounds = sorted(score_ids(cfg.data, dataset)), []
    for record in out.previous_metrics["self_training"]:
        confusion = np.zeros((dataset.num_classes,) * 2, dtype=np.int64)
        folder = out.dir / f"round-{record['round']}" / "pseudo"
        for image_id in masked:
            confusion += confusion_matrix(dataset.load_mask(image_id), load_mask(folder / f"{image_id}.png"),
                                          dataset.num_classes)
        rounds.append(record | {
            "pseudo_masks": iou_scores(confusion, dataset.classes) if masked else not_scored("no masks"),
            "val": not_scored("rescored: a round's network is not kept")})
    return rounds


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    """``force``: compute everything again, even what a finished folder under the same key holds."""
    dataset = open_dataset(cfg.data)
    device = select_device(cfg.device)
    generator = seed_everything(cfg.seed)
    inputs = own_inputs(cfg) | {"upstream": upstream_keys(run_dir, upstream(cfg))}
    mixed = cfg.mode == "mixed"
    full_ids = full_subset(dataset.split_ids(cfg.data.train_split), cfg.mixed, cfg.seed) if mixed else []
    with StageOutput(run_dir, NAME, inputs, reuse=not force) as out:
        if out.reused:  # only the val split or its scoring changed: predict again with the network there
            model = segmentation_network(cfg, dataset.num_classes, training=False).to(device)
            load_checkpoint(out.dir / "model.pt", model)
            loss_by_epoch = out.previous_metrics["train_loss_by_epoch"]
            rounds = (rescored_rounds(cfg, dataset, out) if "self_training" in out.previous_metrics
                      and cfg.mode == "weak" and cfg.seg.self_training.enabled else None)
            if is_main_process():
                for folder in branches(model):
                    shutil.rmtree(out.dir / folder, ignore_errors=True)
            barrier()
        else:
            pseudo, rounds = run_dir / "refine" / "pseudo", None
            if cfg.mode == "weak" and cfg.seg.self_training.enabled:
                pseudo, rounds = self_training_rounds(cfg, dataset, run_dir, out, device)
                generator = seed_everything(cfg.seed + cfg.seg.self_training.rounds)  # as for every round
            model, loss_by_epoch = train_network(cfg, dataset, pseudo, generator, full_ids, device,
                                                 out.dir / CHECKPOINT, f"seg ({cfg.mode})")
            save_checkpoint(out.dir / "model.pt", model)

        atomic_write_bytes(out.dir / CLASSES, "".join(f"{name}\n" for name in dataset.classes).encode())
        val_ids = dataset.split_ids(cfg.data.val_split)
        volumes = Volumes(cfg.data, dataset.root) if cfg.data.volume_pattern else None
        crf = cfg.refine.crf if cfg.seg.crf_predict else None
        largest = cfg.seg.largest_component
        scores = predict_and_score(model, dataset, val_ids, cfg.seg.flip_predict, device,
                                   out.dir if val_ids else None, volumes, out.resumed, crf=crf,
                                   largest_component=largest)
        if world_size() > 1 and val_ids:
            # Per-image HD95 and 3-D volumes do not split across processes: once every share is
            # written, each process scores the whole split from the files (nothing is predicted again).
            barrier()
            scores = predict_and_score(model, dataset, val_ids, cfg.seg.flip_predict, device, out.dir,
                                       volumes, resume=True, share=False, crf=crf, largest_component=largest)
        reason = "no masks" if val_ids else "no val split"
        out.metrics = scored(scores["predictions"], reason) | {
            "mode": cfg.mode,
            "train_loss_by_epoch": loss_by_epoch,
        }
        if rounds is not None:
            out.metrics["self_training"] = rounds
        if mixed:
            out.metrics["teacher"] = scored(scores["predictions_teacher"], reason)
            out.metrics["full_images"] = len(full_ids)
            atomic_write_bytes(out.dir / "full_ids.txt", "".join(f"{i}\n" for i in full_ids).encode())
    return out.metrics
