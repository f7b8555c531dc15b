"""``refine.method: affinity``: PSA's AffinityNet and random walk (Ahn & Kwak, CVPR 2018).

The confident pixels of CRF masks (PSA's, from the CRF on score maps at two background
powers, or refine's two thresholds) teach an AffinityNet which neighbouring pixels belong
together; a random walk along those affinities spreads each CAM, and the background
map(s), over the rest of its object. Rule ``argmax`` (PSA's): each pixel takes the
highest walked score. Rule ``two_backgrounds``: the class whose walked (max-normalised)
score wins over a strong and over a weak background map (``random_walk.fg_bg_power``,
``bg_bg_power``), combined as refine's two thresholds are.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.config import AffinityNetConfig, RandomWalkConfig, RefineConfig
from pipeline.data.dataset import IGNORE
from pipeline.methods.affinity import affinity_loss, random_walk, transition_weights
from pipeline.methods.crf import crf_refine_labels, crf_refine_scores
from pipeline.models.relation_nets import AffinityNet
from pipeline.refinement.learned_walk import LearnedWalk
from pipeline.refinement.masks import MaskMaker, combine_confident


class PsaWalk(LearnedWalk):
    name = "affinity"
    sections = ("affinity", "random_walk")
    network_folder = "affinitynet"

    def uses_thresholds(self) -> bool:
        # The pair labels read either the label_* keys or refine's two thresholds, not both.
        return self.cfg.refine.affinity.labels == "thresholds"

    def cache_config(self) -> dict:
        config = super().cache_config()
        if self.uses_thresholds():
            for key in ("label_powers", "label_crf"):
                config["refine"]["affinity"].pop(key)
        return config

    def build_network(self) -> AffinityNet:
        net = self.cfg.refine.affinity
        return AffinityNet(net.backbone, net.feature_stride, net.embedding_channels, net.head,
                           net.freeze_batchnorm, net.frozen_levels)

    def training_loss(self):
        net = self.cfg.refine.affinity
        return functools.partial(_affinity_training_loss, radius=net.radius,
                                 label_downsample=net.label_downsample)

    def label_masks(self) -> MaskMaker | None:
        if self.cfg.refine.affinity.labels == "psa":
            return functools.partial(psa_label_mask, cfg=self.cfg.refine.affinity)
        return None

    def network_batch(self, image: torch.Tensor) -> torch.Tensor:
        """What the walk feeds the network: the image."""
        return image[None]

    def walked_scores(self, model: AffinityNet, image: torch.Tensor, cams: np.ndarray) -> np.ndarray:
        return propagated_scores(model, image, cams, self.cfg.refine.random_walk)

    def mask_from_scores(self) -> MaskMaker:
        return functools.partial(walk_mask, cfg=self.cfg.refine)

    def metrics(self) -> dict:
        return {"rule": self.cfg.refine.random_walk.rule}


def _affinity_training_loss(model, batch, epoch, radius: int, label_downsample: str) -> dict:
    return affinity_loss(model(batch["image"]), batch["mask"], radius, label_downsample)


def psa_label_mask(image: np.ndarray, cams: np.ndarray, classes: np.ndarray,
                   cfg: AffinityNetConfig) -> np.ndarray:
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


@torch.no_grad()
def propagated_scores(model: AffinityNet, image: torch.Tensor, cams: np.ndarray,
                      cfg: RandomWalkConfig) -> np.ndarray:
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


def walk_mask(image: np.ndarray, scores: np.ndarray, classes: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    """uint8 pseudo mask from :func:`propagated_scores`: the argmax (rule ``argmax``), or the
    winners against the strong and against the weak background combined as refine's two
    thresholds are; with ``random_walk.crf`` each label map is snapped to edges by the CRF first."""

    def winners(background: np.ndarray) -> np.ndarray:
        labels = np.concatenate([background[None], scores[-len(classes):]]).argmax(axis=0)
        return crf_refine_labels(image, labels, len(classes) + 1, cfg.crf) if cfg.random_walk.crf else labels

    if cfg.random_walk.rule == "argmax":
        return np.concatenate([[0], classes]).astype(np.uint8)[winners(scores[0])]
    return combine_confident(winners(scores[0]), winners(scores[1]), classes)
