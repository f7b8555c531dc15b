"""Dense CRF refinement of label maps with pydensecrf (Kraehenbuehl & Koltun, 2011)."""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from pipeline.core.config import CrfConfig


def crf_refine_labels(image: np.ndarray, labels: np.ndarray, num_labels: int, cfg: CrfConfig) -> np.ndarray:
    """Refines an HxW map of labels 0..num_labels-1 so that it follows the image's edges.

    The input labels become unary potentials with confidence ``gt_prob``; a Gaussian
    (smoothness) and a bilateral (appearance) pairwise term then move labels to where
    colour edges are.
    """
    return np.argmax(crf_label_marginals(image, labels, num_labels, cfg), axis=0)


def crf_label_marginals(image: np.ndarray, labels: np.ndarray, num_labels: int, cfg: CrfConfig) -> np.ndarray:
    """The num_labels x H x W marginals behind :func:`crf_refine_labels`: how sure the CRF is of
    each pixel's label (CLIP-ES leaves pixels whose largest marginal is below 0.95 unlabelled)."""
    height, width = labels.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    unary = unary_from_labels(labels, num_labels, gt_prob=cfg.gt_prob, zero_unsure=False)
    return _crf_marginals(image, unary, num_labels, cfg)


def crf_refine_scores(image: np.ndarray, scores: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """The HxW argmax of the CRF's marginals for K x H x W score maps taken as probabilities
    (unary -log(score), clipped at 1e-5; not normalised first), as PSA's crf_inference does
    (psa@9493e59 tool/imutils.py; ``gt_prob`` is unused)."""
    if image.shape[:2] != scores.shape[-2:]:
        raise ValueError(f"image {image.shape[:2]} and scores {scores.shape[-2:]} differ in size")
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    unary = np.ascontiguousarray(unary_from_softmax(scores))
    return np.argmax(_crf_marginals(image, unary, len(scores), cfg), axis=0)


def _crf_marginals(image: np.ndarray, unary: np.ndarray, num_labels: int, cfg: CrfConfig) -> np.ndarray:
    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    crf.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=cfg.bilateral_compat)
    return np.array(crf.inference(cfg.iterations)).reshape(num_labels, height, width)
