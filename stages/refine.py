"""Stage refine: CAMs -> pseudo masks (0 background, 1..C-1 classes, 255 unsure).

``refine.method: crf``. As in IRNet, each image's CAMs are labelled twice, once against a
high background score (``fg_threshold``: what survives is confidently foreground) and
once against a low one (``bg_threshold``: what is still background is confidently
background); a dense CRF snaps both label maps to image edges. Pixels that neither
confirms are unsure.

``refine.method: affinity`` (AffinityNet, Ahn & Kwak, CVPR 2018) goes on from there:
the confident pixels of CRF masks (PSA's, from the CRF on score maps at two background
powers, or refine's two thresholds) teach an AffinityNet which neighbouring pixels belong
together; a random walk along those affinities spreads each CAM, and two background maps,
over the rest of its object; each pixel takes the class whose propagated (max-normalised)
score wins over a strong and over a weak background map (``random_walk.fg_bg_power``,
``bg_bg_power``), combined as the two thresholds are.
The AffinityNet and the CRF masks it learnt from are cached in ``<run-dir>/affinitynet/``
under their own key, which leaves out the random-walk settings, so rerunning refine
with only those changed reuses the trained network.

Outputs in ``<run-dir>/refine/``: ``pseudo/<id>.png`` (the final masks, what seg trains
on; palette PNGs), with the affinity method also ``crf/<id>.png`` (the CRF masks), and
``metrics.json`` scoring every set of masks on the scored ids.
"""
from __future__ import annotations

import copy
import functools
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.cache import (
    CHECKPOINT,
    METRICS,
    VOLUME_SCORING_KEYS,
    StageOutput,
    StageStatus,
    read_json,
    section_for_cache,
    stage_status,
    upstream_keys,
)
from pipeline.core.config import AffinityNetConfig, Config, DataConfig, IrnWalkConfig, RandomWalkConfig, RefineConfig
from pipeline.core.io import load_mask, save_mask
from pipeline.core.metrics import confident_confusion_matrix, confusion_matrix, iou_scores, not_scored
from pipeline.core.runtime import (
    barrier,
    is_main_process,
    parallel_map,
    seed_everything,
    select_device,
    shard,
    sum_across_ranks,
)
from pipeline.core.training import load_checkpoint, loss_curve, make_train_loader, save_checkpoint, train
from pipeline.data.dataset import IGNORE, open_dataset, score_ids, score_split
from pipeline.data.training_set import MaskFolder, TrainingSet, normalize
from pipeline.methods.affinity import (
    affinity_loss,
    boundary_loss,
    normalized_transitions,
    path_affinities,
    random_walk,
    transition_weights,
    walk_offsets,
)
from pipeline.methods.cams import cam_argmax
from pipeline.methods.crf import crf_refine_labels, crf_refine_scores
from pipeline.models.backbones import weights_fingerprint
from pipeline.models.relation_nets import AffinityNet, BoundaryNet
from stages.cam import load_cams

NAME = "refine"
AFFINITY_NET = "affinitynet"  # the cached AffinityNet's folder in the run folder
IRN_NET = "irn"  # the cached IRNet boundary network's folder


def upstream(cfg: Config) -> list[str]:
    return ["cam"]


# Per method: the folder of its cached network, and the refine sections it reads besides the
# CRF settings (the network's, then the walk's).
NETWORKS = {"affinity": AFFINITY_NET, "irn": IRN_NET}
SECTIONS = {"crf": (), "affinity": ("affinity", "random_walk"), "irn": ("irn", "irn_walk")}


def own_inputs(cfg: Config) -> dict:
    dataset = open_dataset(cfg.data)
    method = cfg.refine.method
    keys = ("data", "refine") if method == "crf" else ("seed", "data", "refine")
    config = section_for_cache(cfg, *keys, omit=VOLUME_SCORING_KEYS)
    # Another method's settings do not touch this one's masks.
    unused = {name for section in SECTIONS.values() for name in section} - set(SECTIONS[method])
    config["refine"] = {k: v for k, v in config["refine"].items() if k not in unused}
    if method == "affinity":
        # The pair labels read either the label_* keys or refine's two thresholds, not both.
        if cfg.refine.affinity.labels == "thresholds":
            for key in ("labels", "label_powers", "label_crf"):  # runs cached before these keys stay cached
                config["refine"]["affinity"].pop(key)
        else:
            config["refine"].pop("fg_threshold")
            config["refine"].pop("bg_threshold")
    extra = {}
    if method != "crf":
        section = SECTIONS[method][0]
        extra = {"weights_fingerprint": weights_fingerprint(getattr(cfg.refine, section).backbone,
                                                            f"refine.{section}.backbone.weights")}
    return {"config": config,
            "data_fingerprint": dataset.fingerprint(cfg.data.train_split, [score_split(cfg.data)])} | extra


def relation_net_status(cfg: Config, run_dir: Path, refine_inputs: dict) -> tuple[str, StageStatus] | None:
    """The folder name and state (cached, stale, damaged or missing) of the network refine's
    method trains, under ``cfg``, for ``--dry-run``; None for the crf method."""
    if cfg.refine.method == "crf":
        return None
    folder = NETWORKS[cfg.refine.method]
    return folder, stage_status(run_dir, folder, relation_net_inputs(refine_inputs))


def relation_net_inputs(refine_inputs: dict) -> dict:
    """The cached network's inputs, from refine's (upstream included): everything refine
    depends on except the walk and the method switch."""
    inputs = copy.deepcopy(refine_inputs)
    refine = inputs["config"]["refine"]
    refine.pop("random_walk" if refine.pop("method") == "affinity" else "irn_walk")
    return inputs


# --- CRF masks ---------------------------------------------------------------------------

def pseudo_mask(image: np.ndarray, cams: np.ndarray, classes: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    """uint8 mask: 0 confident background, class index where confidently foreground, 255 unsure."""
    if len(classes) == 0:
        # The image label says there is no object: every pixel is background.
        return np.zeros(image.shape[:2], dtype=np.uint8)
    num_labels = len(classes) + 1
    confident_fg = crf_refine_labels(image, cam_argmax(cams, cfg.fg_threshold), num_labels, cfg.crf)
    confident_bg = crf_refine_labels(image, cam_argmax(cams, cfg.bg_threshold), num_labels, cfg.crf)
    return combine_confident(confident_fg, confident_bg, classes)


def psa_label_mask(image: np.ndarray, cams: np.ndarray, classes: np.ndarray, cfg: AffinityNetConfig) -> np.ndarray:
    """PSA's pair-label mask (psa@9493e59 infer_cls.py:88-107, voc12/data.py VOC12AffDataset):
    the CRF on [(1 - max CAM)^alpha, CAMs] at the low and at the high ``label_powers``; a
    class where the low-alpha (strong background) CRF's argmax says so, background where the
    high-alpha (weak background) one says so, which wins, and unsure (255) elsewhere."""
    if len(classes) == 0:
        return np.zeros(image.shape[:2], dtype=np.uint8)
    evidence = 1 - cams.max(axis=0, keepdims=True)
    low, high = (crf_refine_scores(image, np.concatenate([evidence ** power, cams]), cfg.label_crf)
                 for power in cfg.label_powers)
    mask = np.concatenate([[0], classes]).astype(np.uint8)[low]
    mask[low == 0] = IGNORE
    mask[high == 0] = 0
    return mask


def combine_confident(confident_fg: np.ndarray, confident_bg: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The pseudo mask from two label maps (0 background, k for the k-th class of ``classes``),
    one made against a strong background and one against a weak one: a class where the
    first says so, background where both say so, unsure (255) elsewhere."""
    keys = np.concatenate([[0], classes]).astype(np.uint8)
    mask = keys[confident_fg]
    mask[confident_fg == 0] = IGNORE
    mask[(confident_fg == 0) & (confident_bg == 0)] = 0
    return mask


def _save_and_score(image_id: str, mask: np.ndarray, data: DataConfig, scored: set[str], out_dir: Path):
    """Writes one mask; returns its confusion matrices (zero when the id is not scored: unsure
    as background, and confident pixels only) and its unsure and total pixel counts."""
    save_mask(out_dir / f"{image_id}.png", mask)
    counts = int((mask == IGNORE).sum()), mask.size
    if image_id not in scored:
        return (0, 0) + counts
    dataset = open_dataset(data)
    gt = dataset.load_mask(image_id)
    as_background = np.where(mask == IGNORE, 0, mask).astype(np.uint8)
    return (confusion_matrix(gt, as_background, dataset.num_classes),
            confident_confusion_matrix(gt, mask, dataset.num_classes)) + counts


def _written(out_dir: Path, image_id: str, resume: bool) -> np.ndarray | None:
    """The mask a resumed stage wrote before it was killed (complete: written atomically), or None."""
    path = out_dir / f"{image_id}.png"
    return load_mask(path) if resume and path.is_file() else None


def _crf_mask_one(image_id: str, data: DataConfig, scored: set[str], cam_dir: Path, out_dir: Path,
                  make_mask: functools.partial, resume: bool):
    """Worker task: the CRF mask of one image (``make_mask(image, cams, classes)``), written and scored."""
    mask = _written(out_dir, image_id, resume)
    if mask is None:
        cams, classes = load_cams(cam_dir, image_id)
        mask = make_mask(open_dataset(data).load_image(image_id), cams, classes)
    return _save_and_score(image_id, mask, data, scored, out_dir)


def _collect_scores(results: Iterable, total: int, class_names: list[str], desc: str) -> dict:
    """Sums the workers' confusion matrices into the masks' scores; times the whole pass."""
    started = time.perf_counter()
    confusion = np.zeros((len(class_names),) * 2, dtype=np.int64)
    confident = confusion.copy()
    unsure = pixels = scored = 0
    for cm, cm_sure, n_unsure, n_pixels in tqdm(results, total=total, desc=desc, leave=False,
                                                disable=not is_main_process()):
        confusion, confident = confusion + cm, confident + cm_sure
        unsure, pixels = unsure + n_unsure, pixels + n_pixels
        scored += not isinstance(cm, int)  # unscored ids return 0 for their matrices
    # Under torchrun each process scored its share: the sums are the whole split's.
    confusion, confident = sum_across_ranks(confusion), sum_across_ranks(confident)
    unsure, pixels, scored = (sum_across_ranks(unsure), sum_across_ranks(pixels), sum_across_ranks(scored))
    counts = {"unsure_fraction": round(unsure / max(pixels, 1), 4),
              "seconds_per_image": round((time.perf_counter() - started) / max(total, 1), 4)}
    if not scored:
        return not_scored("no masks") | counts
    confident_scores = iou_scores(confident, class_names)
    return iou_scores(confusion, class_names) | counts | {
        "scored_images": scored,
        "confident_miou": confident_scores["miou"],
        "confident_per_class_iou": confident_scores["per_class_iou"],
    }


def write_crf_masks(cfg: Config, run_dir: Path, ids: list[str], out_dir: Path, resume: bool,
                    psa_labels: bool = False) -> dict:
    """The CRF masks of ``ids`` in ``out_dir``, scored: refine's two thresholds, or with
    ``psa_labels`` PSA's pair-label masks; ``resume`` keeps the masks already there."""
    dataset = open_dataset(cfg.data)
    out_dir.mkdir(exist_ok=True)  # a new partial folder is empty; under torchrun every process makes it
    make_mask = (functools.partial(psa_label_mask, cfg=cfg.refine.affinity) if psa_labels
                 else functools.partial(pseudo_mask, cfg=cfg.refine))
    task = functools.partial(_crf_mask_one, data=cfg.data, scored=score_ids(cfg.data, dataset),
                             cam_dir=run_dir / "cam" / "cams", out_dir=out_dir, make_mask=make_mask, resume=resume)
    with parallel_map(task, ids, cfg.refine.workers) as results:
        scores = _collect_scores(results, len(ids), dataset.classes, "refine (CRF)")
    rule = ({"label_powers": cfg.refine.affinity.label_powers} if psa_labels
            else {"fg_threshold": cfg.refine.fg_threshold, "bg_threshold": cfg.refine.bg_threshold})
    return scores | rule | {"workers": cfg.refine.workers}


# --- The relation network: AffinityNet or IRNet's boundary map ----------------------------

def _affinity_training_loss(model, batch, epoch, radius: int, label_downsample: str) -> dict:
    return affinity_loss(model(batch["image"]), batch["mask"], radius, label_downsample)


def _boundary_training_loss(model, batch, epoch, radius: int, label_downsample: str) -> dict:
    return boundary_loss(torch.sigmoid(model(batch["image"])), batch["mask"], radius, label_downsample)


def build_relation_net(cfg: RefineConfig) -> AffinityNet | BoundaryNet:
    if cfg.method == "irn":
        return BoundaryNet(cfg.irn.backbone, cfg.irn.freeze_backbone)
    net = cfg.affinity
    return AffinityNet(net.backbone, net.feature_stride, net.embedding_channels, net.head, net.freeze_batchnorm,
                       net.frozen_levels)


def relation_net(cfg: Config, run_dir: Path, refine_inputs: dict,
                 device: torch.device) -> tuple[AffinityNet | BoundaryNet, Path]:
    """The trained network of refine's method and its folder (with ``crf/``, the CRF masks it
    learnt from): from the cache when its key matches, else made now (CRF masks, training)."""
    dataset = open_dataset(cfg.data)
    folder = NETWORKS[cfg.refine.method]
    net_cfg = getattr(cfg.refine, SECTIONS[cfg.refine.method][0])
    inputs = relation_net_inputs(refine_inputs)
    # Seeded before the network is built: its initial weights must not depend on whether cam
    # ran earlier in this process (one cache key, one network).
    generator = seed_everything(cfg.seed)
    model = build_relation_net(cfg.refine)
    if stage_status(run_dir, folder, inputs).state == "cached":
        load_checkpoint(run_dir / folder / "model.pt", model)
        if is_main_process():
            print(f"refine: reusing the network in {run_dir / folder} (its inputs are unchanged)", file=sys.stderr)
        return model.to(device).eval(), run_dir / folder
    with StageOutput(run_dir, folder, inputs) as out:
        train_ids = dataset.split_ids(cfg.data.train_split)
        psa_labels = cfg.refine.method == "affinity" and cfg.refine.affinity.labels == "psa"
        crf_scores = write_crf_masks(cfg, run_dir, shard(train_ids), out.dir / "crf", out.resumed, psa_labels)
        barrier()  # the network trains on every process's CRF masks
        started = time.perf_counter()
        train_set = TrainingSet(dataset, train_ids, net_cfg.train.crop_size, net_cfg.train.scale_range,
                                pixel_labels={"mask": MaskFolder(out.dir / "crf")},
                                color_jitter=net_cfg.train.color_jitter)
        loader = make_train_loader(train_set, net_cfg.train, cfg.data.loader_workers, generator)
        loss = functools.partial(_boundary_training_loss if cfg.refine.method == "irn" else _affinity_training_loss,
                                 radius=net_cfg.radius, label_downsample=net_cfg.label_downsample)
        history = train(model.to(device), loader, loss, net_cfg.train, device, folder, out.dir / CHECKPOINT)
        save_checkpoint(out.dir / "model.pt", model)
        # The three loss terms and the negative pairs' mean affinity per epoch: an
        # under-trained network shows as a high neg_affinity and a still-falling neg term.
        out.metrics = {"crf": crf_scores, "train_steps": len(history) * len(loader),
                       "train_seconds": round(time.perf_counter() - started, 1)} | {
            f"train_{term}_by_epoch": loss_curve(history, term) for term in ("loss", "bg", "fg", "neg", "neg_affinity")}
    return model.to(device).eval(), run_dir / folder


# --- Random walk -------------------------------------------------------------------------

@torch.no_grad()
def propagated_scores(model: AffinityNet, image: torch.Tensor, cams: np.ndarray, cfg: RandomWalkConfig) -> np.ndarray:
    """The walked score maps of one 3 x H x W image, at its size: the background map(s), then
    the K CAMs. Rule ``argmax`` (PSA, infer_aff.py:96-118): one background (1 - max CAM)^bg_power,
    made at the image's resolution and pooled with the CAMs to the embedding map, the walk,
    bilinear upsampling, no rescaling. Rule ``two_backgrounds``: the strong and the weak
    background map, each walked map divided by its maximum."""
    embeddings = model(image[None])
    cams = torch.from_numpy(cams).to(image.device, torch.float32)
    evidence = 1 - cams.amax(dim=0, keepdim=True)
    powers = [cfg.bg_power] if cfg.rule == "argmax" else [cfg.fg_bg_power, cfg.bg_bg_power]
    maps = torch.cat([evidence.pow(power) for power in powers] + [cams])[None]
    maps = F.adaptive_avg_pool2d(maps, embeddings.shape[-2:])
    weights, offsets = transition_weights(embeddings, cfg.radius, cfg.beta, cfg.pairs)
    maps = random_walk(maps, weights, offsets, cfg.iterations)  # the walk is linear: all maps in one pass
    maps = F.interpolate(maps, size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
    if cfg.rule == "two_backgrounds":
        maps = maps / maps.flatten(1).amax(dim=1).clamp_min(1e-5)[:, None, None]
    return maps.cpu().numpy()


@torch.no_grad()
def boundary_scores(model: BoundaryNet, image: torch.Tensor, cams: np.ndarray, cfg: IrnWalkConfig) -> np.ndarray:
    """IRNet's walk on one 3 x H x W image (make_sem_seg_labels.py:37-49, misc/indexing.py:141-167):
    the boundary map (the mean of the image's and its mirror's logits, then a sigmoid), the CAMs
    pooled to it and multiplied by (1 - boundary), walked along the path affinities, upsampled,
    divided by their overall maximum; returned after the constant background map
    ``bg_threshold``, the K CAMs following, at the image's size."""
    logits = model(torch.stack([image, image.flip(-1)]))
    boundary = torch.sigmoid((logits[0] + logits[1].flip(-1)) / 2)[None]
    maps = F.adaptive_avg_pool2d(torch.from_numpy(cams).to(image.device, torch.float32)[None], boundary.shape[-2:])
    offsets = walk_offsets(cfg.radius)
    weights = normalized_transitions(path_affinities(boundary, offsets), offsets, cfg.beta, cfg.radius, "all")
    maps = random_walk(maps * (1 - boundary), weights, offsets, cfg.iterations)
    maps = F.interpolate(maps, size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
    maps = maps / maps.max().clamp_min(1e-5)
    return torch.cat([torch.full_like(maps[:1], cfg.bg_threshold), maps]).cpu().numpy()


def walk_mask(image: np.ndarray, scores: np.ndarray, classes: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    """uint8 pseudo mask from the walked scores (:func:`propagated_scores` or
    :func:`boundary_scores`): the argmax (irn, and affinity's ``argmax`` rule), or the winners
    against the strong and against the weak background combined as refine's two thresholds
    are; with ``random_walk.crf`` each label map is snapped to edges by the CRF first."""
    snap = cfg.method == "affinity" and cfg.random_walk.crf

    def winners(background: np.ndarray) -> np.ndarray:
        labels = np.concatenate([background[None], scores[-len(classes):]]).argmax(axis=0)
        return crf_refine_labels(image, labels, len(classes) + 1, cfg.crf) if snap else labels

    if cfg.method == "irn" or cfg.random_walk.rule == "argmax":
        return np.concatenate([[0], classes]).astype(np.uint8)[winners(scores[0])]
    return combine_confident(winners(scores[0]), winners(scores[1]), classes)


def _walk_mask_one(item, data: DataConfig, scored: set[str], out_dir: Path, cfg: RefineConfig, resume: bool):
    """Worker task: the final mask of one image from its propagated scores, written and scored."""
    image_id, scores, classes = item
    mask = _written(out_dir, image_id, resume)
    if mask is None:
        image = open_dataset(data).load_image(image_id)
        # No class in the image label (nothing was walked): every pixel is background.
        mask = (np.zeros(image.shape[:2], dtype=np.uint8) if len(classes) == 0
                else walk_mask(image, scores.astype(np.float32), classes, cfg))
    return _save_and_score(image_id, mask, data, scored, out_dir)


def _walk_all(model: AffinityNet | BoundaryNet, ids: list[str], cfg: Config, cam_dir: Path, device: torch.device,
              done: Path | None) -> Iterator:
    """(id, propagated scores as float16, classes) per image, computed on ``device``; none for
    the images whose mask is already in the folder ``done`` (a resumed stage)."""
    dataset = open_dataset(cfg.data)
    for image_id in ids:
        cams, classes = load_cams(cam_dir, image_id)
        if len(classes) == 0 or (done is not None and (done / f"{image_id}.png").is_file()):
            yield image_id, None, classes
            continue
        image = normalize(dataset.load_image(image_id)).to(device)
        scores = (boundary_scores(model, image, cams, cfg.refine.irn_walk) if cfg.refine.method == "irn"
                  else propagated_scores(model, image, cams, cfg.refine.random_walk))
        yield image_id, scores.astype(np.float16), classes


def run(cfg: Config, run_dir: Path) -> dict:
    dataset = open_dataset(cfg.data)
    train_ids = shard(dataset.split_ids(cfg.data.train_split))
    inputs = own_inputs(cfg) | {"upstream": upstream_keys(run_dir, upstream(cfg))}
    cam_miou = (read_json(run_dir / "cam" / METRICS) or {}).get("miou")
    if cfg.refine.method == "crf":
        with StageOutput(run_dir, NAME, inputs) as out:
            scores = write_crf_masks(cfg, run_dir, train_ids, out.dir / "pseudo", out.resumed)
            out.metrics = {"method": "crf"} | with_gain(scores, cam_miou)
        return out.metrics

    device = select_device(cfg.device)
    model, net_dir = relation_net(cfg, run_dir, inputs, device)
    with StageOutput(run_dir, NAME, inputs) as out:
        if is_main_process():
            shutil.copytree(net_dir / "crf", out.dir / "crf", dirs_exist_ok=out.resumed)
        (out.dir / "pseudo").mkdir(exist_ok=True)
        task = functools.partial(_walk_mask_one, data=cfg.data, scored=score_ids(cfg.data, dataset),
                                 out_dir=out.dir / "pseudo", cfg=cfg.refine, resume=out.resumed)
        walked = _walk_all(model, train_ids, cfg, run_dir / "cam" / "cams", device,
                           out.dir / "pseudo" if out.resumed else None)
        with parallel_map(task, walked, cfg.refine.workers) as results:
            scores = _collect_scores(results, len(train_ids), dataset.classes, "refine (random walk)")
        net_metrics = read_json(net_dir / METRICS) or {}
        rule = cfg.refine.random_walk.rule if cfg.refine.method == "affinity" else "argmax"
        out.metrics = {"method": cfg.refine.method, "rule": rule} | with_gain(scores, cam_miou) | {
            "crf": with_gain(net_metrics.get("crf") or {}, cam_miou),
            "net_train_steps": net_metrics.get("train_steps"),
            "net_train_seconds": net_metrics.get("train_seconds"),
        }
    return out.metrics


def with_gain(scores: dict, cam_miou: float | None) -> dict:
    """``scores`` with ``cam_miou`` (the CAMs' own score, from cam's metrics.json) and
    ``gain_over_cam``: how far these masks' mIoU (unsure counted as background, the argmax
    protocol of PSA and IRNet) lies above the CAMs they were made from."""
    if scores.get("miou") is None or cam_miou is None:
        return scores
    return scores | {"cam_miou": cam_miou, "gain_over_cam": round(scores["miou"] - cam_miou, 4)}
