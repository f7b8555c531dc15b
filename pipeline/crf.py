"""Dense CRF refinement of label maps with pydensecrf (Kraehenbuehl & Koltun, 2011)."""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels

from pipeline.config import CrfConfig


def crf_refine_labels(image: np.ndarray, labels: np.ndarray, num_labels: int, cfg: CrfConfig) -> np.ndarray:
    """Refines an HxW map of labels 0..num_labels-1 so that it follows the image's edges.

    The input labels become unary potentials with confidence ``gt_prob``; a Gaussian
    (smoothness) and a bilateral (appearance) pairwise term then move labels to where
    colour edges are.
    """
    height, width = labels.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(unary_from_labels(labels, num_labels, gt_prob=cfg.gt_prob, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    crf.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=cfg.bilateral_compat)
    q = np.array(crf.inference(cfg.iterations)).reshape(num_labels, height, width)
    return np.argmax(q, axis=0)
