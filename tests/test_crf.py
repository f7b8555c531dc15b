import numpy as np
import torch

from pipeline.core.config import CrfConfig
from pipeline.methods.crf import crf_label_marginals, crf_refine_labels, crf_refine_scores
from pipeline.models.networks import predict_batch, predict_with_crf


def test_crf_moves_a_shifted_label_boundary_onto_the_colour_edge():
    rng = np.random.default_rng(0)
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :30] = (200, 40, 40)
    image[:, 30:] = (40, 40, 200)
    image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((40, 60), np.int64)
    truth[:, 30:] = 1
    labels = np.zeros((40, 60), np.int64)
    labels[:, 36:] = 1  # boundary 6 px off the edge
    refined = crf_refine_labels(image, labels, 2, CrfConfig(bilateral_sxy=20))
    assert refined.shape == labels.shape
    assert (refined == truth).mean() > (labels == truth).mean()
    assert (refined == truth).mean() > 0.97


def test_crf_keeps_a_small_region_that_has_its_own_colour_but_smooths_one_that_has_not():
    image = np.full((30, 30, 3), 128, np.uint8)
    image[5:15, 5:15] = (230, 30, 30)
    labels = np.zeros((30, 30), np.int64)
    labels[5:15, 5:15] = 2  # backed by a colour edge
    labels[20:23, 20:23] = 1  # a 3x3 island on flat colour: noise to the CRF
    refined = crf_refine_labels(image, labels, 3, CrfConfig(bilateral_sxy=10))
    assert (refined[5:15, 5:15] == 2).mean() > 0.95
    assert (refined[20:23, 20:23] == 1).sum() == 0


def test_label_marginals_are_probabilities_least_sure_where_the_labels_disagree_with_the_edge():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 20:] = 220
    labels = np.zeros((20, 40), np.int64)
    labels[:, 26:] = 1  # 6 px short of the colour edge at column 20
    cfg = CrfConfig(bilateral_sxy=20)
    marginals = crf_label_marginals(image, labels, 2, cfg)
    assert marginals.shape == (2, 20, 40)
    np.testing.assert_allclose(marginals.sum(axis=0), 1.0, atol=1e-5)
    assert (marginals.argmax(axis=0) == crf_refine_labels(image, labels, 2, cfg)).all()
    confidence = marginals.max(axis=0)
    assert confidence[:, 21:25].mean() < confidence[:, :10].mean()  # the strip the labels got wrong


def test_crf_on_scores_without_pairwise_terms_is_the_argmax_of_the_clipped_scores():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (12, 15, 3), dtype=np.uint8)
    scores = rng.random((3, 12, 15)).astype(np.float32) * 2  # not normalised, as PSA passes them
    scores[1, :4] = 0  # clipped at 1e-5, not log(0)
    unary_only = CrfConfig(gaussian_compat=0, bilateral_compat=0)
    assert (crf_refine_scores(image, scores, unary_only) == np.clip(scores, 1e-5, 1).argmax(axis=0)).all()


def test_crf_on_scores_moves_a_shifted_score_boundary_onto_the_colour_edge():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :30] = (200, 40, 40)
    image[:, 30:] = (40, 40, 200)
    scores = np.full((2, 40, 60), 0.3, np.float32)
    scores[0, :, :36] = 0.6  # class 0 reaches 6 px past the edge
    scores[1, :, 36:] = 0.6
    refined = crf_refine_scores(image, scores, CrfConfig(bilateral_sxy=20))
    assert (refined[:, :30] == 0).mean() > 0.97 and (refined[:, 30:] == 1).mean() > 0.97


def test_seg_prediction_through_the_crf_snaps_a_blurred_boundary_to_the_colour_edge():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :30] = (200, 40, 40)
    image[:, 30:] = (40, 40, 200)
    logits = torch.zeros(1, 2, 40, 60)
    logits[0, 1, :, 36:] = 1.0  # the network's boundary 6 px off the edge, not confident
    logits[0, 0, :, :36] = 1.0

    def forward(batch):  # the same logits for the image and its mirror (mirrored back)
        return torch.cat([logits, logits.flip(-1)])[:len(batch)]

    tensor = torch.zeros(3, 40, 60)
    plain = predict_batch(forward, [tensor], flip=True)[0]
    unary_only = CrfConfig(gaussian_compat=0, bilateral_compat=0)
    np.testing.assert_array_equal(predict_with_crf(forward, tensor, image, True, unary_only), plain)
    snapped = predict_with_crf(forward, tensor, image, True, CrfConfig(bilateral_sxy=20))
    assert (plain[:, 30:36] == 0).all() and (snapped[:, 31:36] == 1).all()
