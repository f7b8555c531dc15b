import numpy as np
import torch
import torch.nn.functional as F
from skimage.filters import threshold_otsu, threshold_yen

from pipeline.core.config import AdvCamConfig, BackboneConfig
from pipeline.methods.cams import (
    MAX_CAM_BINS,
    _climb,
    _steps_at,
    adversarial_cams,
    cam_thresholds,
    cam_to_label,
    max_cam_histogram,
    multiscale_cams,
)
from pipeline.methods.losses import recam_loss
from pipeline.models.networks import CAMNet


def tiny_camnet(num_fg=3):
    torch.manual_seed(0)
    return CAMNet(BackboneConfig(name="resnet18", output_stride=16), num_fg).eval()


def test_cams_have_image_size_present_classes_only_and_max_one():
    model = tiny_camnet()
    image = torch.randn(3, 37, 45)
    cams = multiscale_cams(model, image, np.array([1, 3]), scales=[1.0, 0.5, 1.5], flip=True)
    assert cams.shape == (2, 37, 45) and cams.dtype == np.float32
    assert cams.min() >= 0
    np.testing.assert_allclose(cams.reshape(2, -1).max(axis=1), 1.0, rtol=1e-5)


def test_cams_are_the_classifier_applied_to_the_last_feature_map():
    model = tiny_camnet()
    image = torch.randn(3, 32, 32)
    cams = multiscale_cams(model, image, np.array([2]), scales=[1.0], flip=False)
    with torch.no_grad():
        features = model.backbone(image[None])[-1]
        raw = torch.relu(torch.einsum("bchw,kc->bkhw", features, model.classifier.weight[:, :, 0, 0]))[:, 1:2]
        expected = torch.nn.functional.interpolate(raw, size=(32, 32), mode="bilinear",
                                                   align_corners=False)[0]
    expected = (expected / expected.max()).numpy()
    np.testing.assert_allclose(cams, expected, atol=1e-5)


def test_flip_makes_cams_mirror_symmetric_in_the_input():
    model = tiny_camnet()
    image = torch.randn(3, 32, 48)
    a = multiscale_cams(model, image, np.array([1]), scales=[1.0], flip=True)
    b = multiscale_cams(model, image.flip(-1), np.array([1]), scales=[1.0], flip=True)
    np.testing.assert_allclose(a, b[..., ::-1], atol=1e-5)


def test_no_classes_gives_no_maps():
    cams = multiscale_cams(tiny_camnet(), torch.randn(3, 16, 16), np.array([], np.int64), [1.0], True)
    assert cams.shape == (0, 16, 16)


def test_cam_to_label_uses_the_background_threshold():
    cams = np.array([[[0.9, 0.1, 0.3]], [[0.2, 0.05, 0.6]]], dtype=np.float32)
    np.testing.assert_array_equal(cam_to_label(cams, np.array([2, 5]), 0.25), [[2, 0, 5]])
    np.testing.assert_array_equal(cam_to_label(cams, np.array([2, 5]), 0.95), [[0, 0, 0]])


def test_recam_loss_is_the_authors_per_image_loop():
    """ReCAM's Net_CAM_Feature + Class_Predictor (net/resnet50_cam.py:81-100,147-172), written
    as the authors loop over images, against forward_recam + recam_loss."""
    model = tiny_camnet(num_fg=5)
    model.attach_recam()
    images = torch.randn(3, 3, 64, 64)
    labels = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]])
    logits, class_logits = model.forward_recam(images)
    features = model.backbone(images)[-1]
    cams = torch.relu(torch.nn.functional.conv2d(features, model.classifier.weight))
    cams = cams / (torch.nn.functional.adaptive_max_pool2d(cams, (1, 1)) + 1e-5)
    class_features = (cams.unsqueeze(2) * features.unsqueeze(1)).flatten(3).mean(-1)
    expected = 0
    for i in range(len(images)):
        present = labels[i].nonzero().squeeze(1)
        if len(present):
            predicted = model.recam(class_features[i][present][..., None, None]).flatten(1)
            expected = expected + torch.nn.functional.cross_entropy(predicted, present)
    torch.testing.assert_close(recam_loss(class_logits, labels), expected / len(images))
    torch.testing.assert_close(logits, model(images))


def test_recam_cams_use_the_product_of_both_classifiers():
    model = tiny_camnet(num_fg=2)
    image = torch.randn(1, 3, 32, 32)
    plain = model.cams(image)
    model.attach_recam()
    with torch.no_grad():
        model.recam.weight.fill_(1.0)
    torch.testing.assert_close(model.cams(image), plain)  # a weight of 1 leaves the CAMs as they were
    with torch.no_grad():
        model.recam.weight[1].fill_(-1.0)  # class 2's weights flipped: its CAM is the other side's ReLU
    own_map = torch.nn.functional.conv2d(model.backbone(image)[-1], model.classifier.weight[1:2])
    torch.testing.assert_close(model.cams(image)[:, 1], torch.relu(-own_map)[:, 0])


def test_max_cam_histogram_counts_every_pixel_of_an_image_with_classes_and_none_without():
    cams = np.zeros((2, 4, 5), dtype=np.float32)
    cams[0, :2] = 0.9
    cams[1, :, :1] = 0.3
    histogram = max_cam_histogram(cams)
    assert histogram.sum() == 20 and histogram[int(0.9 * MAX_CAM_BINS)] == 10
    assert histogram[0] == 8 and histogram[int(0.3 * MAX_CAM_BINS)] == 2  # row-0/1 pixels took 0.9
    assert max_cam_histogram(np.zeros((0, 4, 5), dtype=np.float32)).sum() == 0


def test_otsu_thresholds_split_foreground_from_the_rest_then_background_from_unsure():
    rng = np.random.default_rng(0)
    # Three populations of pixels' highest CAM: background near 0.05, unsure near 0.3, objects near 0.8.
    background, unsure = rng.normal(0.05, 0.02, 6000), rng.normal(0.3, 0.03, 2000)
    objects = rng.normal(0.8, 0.05, 2000)
    values = np.concatenate([background, unsure, objects])
    histogram = max_cam_histogram(np.clip(values, 0, 1).astype(np.float32)[None, None])
    high, low = cam_thresholds(histogram)
    assert (objects > high).mean() == 1.0 and (unsure < high).mean() > 0.99
    assert (unsure > low).mean() > 0.99 and (background < low).mean() > 0.99


def test_label_free_thresholds_are_none_where_the_cams_leave_nothing_to_split():
    one_value = max_cam_histogram(np.full((1, 4, 4), 0.5, dtype=np.float32))
    two_values = max_cam_histogram(np.array([[[0.2, 0.9]]], dtype=np.float32))
    for rule in ("otsu", "yen"):
        assert cam_thresholds(np.zeros(MAX_CAM_BINS, dtype=np.int64), rule) is None  # no tagged image
        assert cam_thresholds(one_value, rule) is None
        assert cam_thresholds(two_values, rule) is None  # a high split, but nothing below it to split again


def test_each_rule_splits_the_pixels_as_skimage_does_on_them_and_otsu_splits_the_rest():
    rng = np.random.default_rng(0)
    # Background near 0, a tail of weak activation around the objects, the objects near 0.75.
    background, tail = rng.beta(1, 12, 8000), rng.uniform(0.05, 0.4, 3000)
    objects = np.clip(rng.normal(0.75, 0.1, 1500), 0, 1)
    values = np.concatenate([background, tail, objects]).astype(np.float32)
    histogram = max_cam_histogram(values[None, None])
    highs = {}
    for rule, split in (("otsu", threshold_otsu), ("yen", threshold_yen)):
        highs[rule], low = cam_thresholds(histogram, rule)
        bin_width = 1 / MAX_CAM_BINS
        assert abs(highs[rule] - split(values, nbins=MAX_CAM_BINS)) < bin_width
        assert abs(low - threshold_otsu(values[values < highs[rule]], nbins=MAX_CAM_BINS)) < 2 * bin_width
    assert abs(highs["otsu"] - highs["yen"]) > 0.03  # two different rules


def test_advcam_with_one_step_and_no_mirror_is_the_plain_cams():
    """One step reads the maps once: the Grad-CAM factor is then the same for every scale of a
    class, and the max-normalisation removes it."""
    model, image = tiny_camnet(), torch.randn(3, 40, 36)
    plain = multiscale_cams(model, image, np.array([1, 3]), scales=[1.0, 0.5, 1.5], flip=False)
    one_step = adversarial_cams(model, image, np.array([1, 3]), [1.0, 0.5, 1.5], False,
                                AdvCamConfig(iterations=1))
    np.testing.assert_allclose(one_step, plain, atol=1e-5)


def test_advcam_weighs_the_mirror_pair_by_positive_pixels_as_the_authors_grad_cam():
    model, image = tiny_camnet(), torch.randn(3, 32, 48)
    cams = adversarial_cams(model, image, np.array([2]), [1.0], True, AdvCamConfig(iterations=1))
    with torch.no_grad():
        maps = model.cams(torch.stack([image, image.flip(-1)]))[:, 1]
    positive = (maps > 0).flatten(1).sum(dim=1).float()
    expected = positive[0] * maps[0] + positive[1] * maps[1].flip(-1)  # 1 / (N K+) cancels
    expected = F.interpolate(expected[None, None], size=(32, 48), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(cams, (expected / expected.max()).numpy(), atol=1e-5)


def test_advcam_climbs_the_class_score_against_the_others_and_sums_every_step():
    model, image = tiny_camnet(), torch.randn(3, 48, 48)
    batch = torch.stack([image, image.flip(-1)])
    channel, config = 1, AdvCamConfig(iterations=4, mask_weight=0.0)
    summed, climbed = _climb(model, batch, channel, torch.tensor(100), 4, True, config)

    def margin(x):
        with torch.no_grad():
            scores = model.cams(x).mean(dim=(2, 3))
        return float(2 * scores[:, channel].sum() - scores.sum())

    assert margin(climbed) > margin(batch)
    assert climbed.min() >= batch.min() and climbed.max() <= batch.max()  # clipped to the range
    first, _ = _climb(model, batch, channel, torch.tensor(100), 1, True, config)
    assert summed.sum() > first.sum()  # later steps' maps added to the first


def test_advcam_mask_term_holds_the_strong_region_to_its_first_map():
    """With the mask term weighted up, the class's map moves less where it was strong at first."""
    model, image = tiny_camnet(), torch.randn(3, 48, 48)
    batch = torch.stack([image, image.flip(-1)])

    def change_in_mask(weight):
        _, climbed = _climb(model, batch, 0, torch.tensor(100), 3, True,
                            AdvCamConfig(iterations=3, mask_weight=weight))
        with torch.no_grad():
            before, after = model.cams(batch)[:, 0], model.cams(climbed)[:, 0]
        mask = before > 0.5 * before.amax(dim=(1, 2), keepdim=True)
        return float(((after - before).abs() * mask).sum())

    assert change_in_mask(1e6) < change_in_mask(0.0)


def test_advcam_steps_per_scale_are_the_authors():
    assert [_steps_at(s, 27) for s in (1.0, 0.5, 1.5, 2.0)] == [27, 13, 27, 27]
    assert _steps_at(0.5, 8) == 5 and _steps_at(0.5, 4) == 4
