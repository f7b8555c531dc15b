"""Class Activation Maps: multi-scale, flip-averaged, max-normalised per class."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage.filters import threshold_otsu, threshold_yen

from pipeline.core.config import AdvCamConfig
from pipeline.core.errors import CacheError
from pipeline.core.io import load_arrays
from pipeline.models.networks import CAMNet


@torch.no_grad()
def multiscale_cams(model: CAMNet, image: torch.Tensor, classes: np.ndarray,
                    scales: list[float], flip: bool) -> np.ndarray:
    """CAMs of the listed foreground classes (1-based indices) for one 3xHxW image.

    At each scale the image (and its mirror, when ``flip``) goes through the network; the
    ReLU'd maps are mirrored back, resized to the image size and summed over scales.
    Each class map is then divided by its maximum, so 1 marks the class's strongest
    evidence in this image. Returns float32 (K, H, W) in [0, 1].
    """
    height, width = image.shape[-2:]
    if len(classes) == 0:
        return np.zeros((0, height, width), dtype=np.float32)
    channels = torch.as_tensor(classes, dtype=torch.long, device=image.device) - 1
    total = torch.zeros(len(classes), height, width, device=image.device)
    for scale in scales:
        cams = model.cams(_scaled_batch(image, scale, flip))[:, channels]
        if flip:
            cams = cams[0:1] + cams[1:2].flip(-1)
        total += F.interpolate(cams, size=(height, width), mode="bilinear", align_corners=False)[0]
    return _max_normalised(total)


def _scaled_batch(image: torch.Tensor, scale: float, flip: bool) -> torch.Tensor:
    """The image resized by ``scale``, and its mirror after it with ``flip``: (1 or 2, 3, h, w)."""
    height, width = image.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
    return torch.cat([scaled, scaled.flip(-1)]) if flip else scaled


def _max_normalised(total: torch.Tensor) -> np.ndarray:
    total /= total.flatten(1).max(dim=1).values.clamp_min(1e-5)[:, None, None]
    return total.cpu().numpy()


def adversarial_cams(model: CAMNet, image: torch.Tensor, classes: np.ndarray, scales: list[float],
                     flip: bool, advcam: AdvCamConfig) -> np.ndarray:
    """AdvCAM's CAMs (cam.advcam) of the listed classes for one 3xHxW image, as
    :func:`multiscale_cams` returns them.

    Per class and scale, the batch of the image and its mirror climbs ``advcam.iterations`` steps
    (jbeomlee93/AdvCAM@2650fcd obtain_CAM_masking.py:90-145). The objective: twice the class's
    score minus the sum of all scores (scores: the mean of the ReLU'd class maps), minus
    ``mask_weight`` times how far the class's map moved from its first value inside the mask
    (where it is above ``mask_threshold`` of its max). Each step adds ``step_size`` times the
    objective's gradient over its largest absolute value, clipped to the batch's range. The
    maps read at every step are summed (the last step's move is not taken: nothing reads it).
    The maps are the authors' Grad-CAM of the last feature map, which for a bias-free 1x1
    classifier is the class map times n_b / (N K+): n_b its positive pixels in batch item b, N
    theirs over the batch, K+ the channels the class weighs positively (gradCAM.py:20-31,90-101;
    torchutils.py:78-83): the scale the mask term's weight was set at. Scales below 1 run about
    half the steps (lines 94-105; the doubled weight meant for them is never reset, so it applies
    to every scale and cancels).
    """
    height, width = image.shape[-2:]
    if len(classes) == 0:
        return np.zeros((0, height, width), dtype=np.float32)
    total = torch.zeros(len(classes), height, width, device=image.device)
    positive_channels = (model.cam_weight().detach().flatten(1) > 0).sum(dim=1)
    for scale in scales:
        start = _scaled_batch(image, scale, flip)
        for k, channel in enumerate(int(c) - 1 for c in classes):
            summed, _ = _climb(model, start, channel, positive_channels[channel],
                               _steps_at(scale, advcam.iterations), flip, advcam)
            total[k] += F.interpolate(summed[None, None], size=(height, width), mode="bilinear",
                                      align_corners=False)[0, 0]
    return _max_normalised(total)


def _steps_at(scale: float, iterations: int) -> int:
    """The authors' steps at a scale: their half-size scale runs half of 11 or more, 5 of 6-10."""
    if scale >= 1 or iterations < 6:
        return iterations
    return iterations // 2 if iterations > 10 else 5


@torch.enable_grad()
def _climb(model: CAMNet, batch: torch.Tensor, channel: int, positive_channels: torch.Tensor,
           steps: int, flip: bool, advcam: AdvCamConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One class's climb at one scale: the sum of its Grad-CAMs over the steps, (h, w), and the
    batch it was read from last."""
    summed, first = None, None
    for step in range(steps):
        batch = batch.detach().requires_grad_(True)  # the caller's batch stays as it was
        maps = model.cams(batch)
        positive = (maps[:, channel] > 0).flatten(1).sum(dim=1).float()
        weights = positive / (positive.sum() * positive_channels).clamp_min(1e-12)
        gradcam = maps[:, channel] * weights[:, None, None]
        region = gradcam[0] + gradcam[1].flip(-1) if flip else gradcam[0]
        if step == 0:
            first, summed = region.detach(), torch.zeros_like(region.detach())
        summed += region.detach()
        if step == steps - 1:
            break  # the authors' last step moves the image once more but nothing reads it
        scores = maps.mean(dim=(2, 3))
        objective = 2 * scores[:, channel].sum() - scores.sum()
        mask = region.detach() / region.detach().max().clamp_min(1e-12) > advcam.mask_threshold
        objective = objective - advcam.mask_weight * ((region - first).abs() * mask).sum()
        (gradient,) = torch.autograd.grad(objective, batch)
        low, high = batch.detach().min(), batch.detach().max()
        batch = batch.detach() + advcam.step_size * gradient / (gradient.abs().max() + 1e-12)
        batch = batch.clamp(low, high)
    return summed, batch.detach()


def cam_argmax(cams: np.ndarray, bg_score: float) -> np.ndarray:
    """Per pixel, 0 where every CAM is below ``bg_score``, else 1 + the index of the strongest CAM."""
    background = np.full((1,) + cams.shape[1:], bg_score, dtype=np.float32)
    padded = np.concatenate([background, cams.astype(np.float32)])
    return np.argmax(padded, axis=0)


def cam_to_label(cams: np.ndarray, classes: np.ndarray, bg_threshold: float) -> np.ndarray:
    """Class-index mask (0 = background) from the CAMs of an image's classes."""
    keys = np.concatenate([[0], classes]).astype(np.uint8)
    return keys[cam_argmax(cams, bg_threshold)]


# Bins of the histogram of the per-pixel highest CAM on [0, 1] that Otsu's rule splits: thresholds
# to a 1/500 step.
MAX_CAM_BINS = 500


def max_cam_histogram(cams: np.ndarray) -> np.ndarray:
    """One image's pixel counts of its highest CAM over MAX_CAM_BINS equal bins of [0, 1]; none
    for an image without classes (its label already says background, its CAMs say nothing)."""
    if len(cams) == 0:
        return np.zeros(MAX_CAM_BINS, dtype=np.int64)
    return np.histogram(cams.max(axis=0), bins=MAX_CAM_BINS, range=(0.0, 1.0))[0].astype(np.int64)


# The label-free rules for refine's high threshold (``refine.thresholds``), by the function that
# splits a histogram given as (counts, bin centres): Otsu's (the largest between-class variance)
# and Yen's (the largest entropic correlation, Yen, Chang & Chang 1995).
THRESHOLD_RULES = {"otsu": threshold_otsu, "yen": threshold_yen}


def cam_thresholds(histogram: np.ndarray, rule: str = "otsu") -> tuple[float, float] | None:
    """Refine's two background scores from the train CAMs alone (no masks): ``rule``'s threshold
    (THRESHOLD_RULES) of every pixel's highest CAM splits what the CAMs call foreground from the
    rest (the high score), and Otsu's threshold of that rest splits confident background from
    unsure (the low one). ``histogram``: :func:`max_cam_histogram` summed over the images. None
    where there is nothing to split (fewer than two distinct values on either side, e.g. no
    tagged image)."""
    edges = np.linspace(0.0, 1.0, MAX_CAM_BINS + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    high = _split(histogram, centers, rule)
    low = None if high is None else _split(histogram[centers < high], centers[centers < high], "otsu")
    return None if low is None else (high, low)


def _split(counts: np.ndarray, centers: np.ndarray, rule: str) -> float | None:
    """``rule``'s threshold of a histogram, over its span of non-empty bins (empty end bins would
    divide by zero); None for fewer than two non-empty bins."""
    filled = np.flatnonzero(counts)
    if len(filled) < 2:
        return None
    span = slice(filled[0], filled[-1] + 1)
    return float(THRESHOLD_RULES[rule](hist=(counts[span], centers[span])))


def load_cams(cam_dir: Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The CAMs (K x H x W float32, one per class in the image label) and the K class indices
    that the cam stage wrote for an image."""
    path = cam_dir / f"{image_id}.npz"
    try:
        arrays = load_arrays(path)
        return arrays["cams"].astype(np.float32), arrays["classes"].astype(np.int64)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise CacheError(f"CAM file {path} is missing or unreadable ({type(error).__name__}); "
                         "recompute it: --stages cam --force") from None
