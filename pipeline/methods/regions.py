"""Region snapping: a pseudo mask's labels voted within image regions that follow colour edges.

The regions are Felzenszwalb & Huttenlocher's graph segmentation (IJCV 2004), scikit-image's
``felzenszwalb``: a region grows while the colour steps inside it stay below those on its
border, so regions end at edges and a large uniform surface stays one region. A region where
most pixels are sure then takes its most frequent sure label, and one where most are unsure
(255) turns unsure: a label that leaks a few pixels across an edge, or stops short of one, is
snapped to it. A stand-in, with no weights to download, for the foundation-model masks (SAM)
the field snaps pseudo labels to now.
"""
from __future__ import annotations

import numpy as np
from skimage.segmentation import felzenszwalb

from pipeline.core.config import RegionsConfig
from pipeline.data.dataset import IGNORE


def image_regions(image: np.ndarray, cfg: RegionsConfig) -> np.ndarray:
    """HxW int region index (0..R-1) of an HxWx3 uint8 image."""
    return felzenszwalb(image, scale=cfg.scale, sigma=cfg.sigma, min_size=cfg.min_size)


def vote_in_regions(mask: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """``mask`` (uint8 labels, 255 unsure) with every region set to its most frequent sure label
    (ties go to the lower label), or to unsure where more than half of the region is unsure."""
    if mask.shape != regions.shape:
        raise ValueError(f"mask {mask.shape} and regions {regions.shape} differ in size")
    labels, codes = np.unique(mask, return_inverse=True)  # sorted: unsure (255) comes last
    counts = np.zeros((int(regions.max()) + 1, len(labels)), dtype=np.int64)
    np.add.at(counts, (regions.ravel(), codes.ravel()), 1)
    has_unsure = labels[-1] == IGNORE
    unsure = counts[:, -1] if has_unsure else np.zeros(len(counts), dtype=np.int64)
    sure = counts[:, :-1] if has_unsure else counts
    if sure.shape[1] == 0:  # nothing sure anywhere
        return mask.copy()
    vote = np.where(2 * unsure > counts.sum(axis=1), IGNORE, labels[sure.argmax(axis=1)])
    return vote[regions].astype(np.uint8)


def snapped(make_mask, image: np.ndarray, maps: np.ndarray, classes: np.ndarray,
            cfg: RegionsConfig) -> np.ndarray:
    """``make_mask(image, maps, classes)`` voted within the image's regions (a MaskMaker, with
    ``make_mask`` and ``cfg`` bound by functools.partial so that the refine workers can run it)."""
    return vote_in_regions(make_mask(image, maps, classes), image_regions(image, cfg))
