"""AffinityNet labels and loss, and the random walk, on hand-made tensors."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.config import AffinityNetConfig, BackboneConfig, CrfConfig, RandomWalkConfig, RefineConfig
from pipeline.methods.affinity import (
    BACKGROUND_POSITIVE,
    FOREGROUND_POSITIVE,
    NEGATIVE,
    affinity_labels,
    affinity_loss,
    boundary_loss,
    downsample_mask,
    neighbour_offsets,
    normalized_transitions,
    pair_affinities,
    path_affinities,
    path_points,
    random_walk,
    transition_weights,
    walk_offsets,
)
from pipeline.models.relation_nets import AffinityNet, BoundaryNet
from pipeline.refinement.psa import psa_label_mask, walk_mask

IGNORED = 255


def test_offsets_lie_within_the_radius_and_half_counts_each_pair_once():
    assert sorted(neighbour_offsets(2, half=True)) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    full = neighbour_offsets(5, half=False)
    assert len(full) == 68 and all(0 < dy * dy + dx * dx < 25 for dy, dx in full)
    half = neighbour_offsets(5, half=True)
    assert len(half) == 34 and not any((-dy, -dx) in half for dy, dx in half)


def test_affinity_labels_of_a_hand_made_mask():
    mask = torch.tensor([[[1, 1, 0, IGNORED, 0, 0]]])  # one row: class 1, class 1, bg, unsure, bg, bg
    labels = affinity_labels(mask, radius=2)
    offsets = neighbour_offsets(2, half=True)
    right = labels[0, offsets.index((0, 1)), 0].tolist()
    # pairs (0,1) same class, (1,2) class vs bg, (2,3) and (3,4) touch the unsure pixel,
    # (4,5) both background, (5, outside) ignored
    assert right == [FOREGROUND_POSITIVE, NEGATIVE, IGNORED, IGNORED, BACKGROUND_POSITIVE, IGNORED]
    # every other offset goes to the next row, outside this one-row image
    assert (labels[0, [i for i, o in enumerate(offsets) if o != (0, 1)]] == IGNORED).all()


def test_pairs_at_or_beyond_the_radius_get_no_label():
    mask = torch.zeros(1, 1, 8, dtype=torch.long)
    mask[0, 0, 4:] = 1
    labels = affinity_labels(mask, radius=3)  # dx = 1, 2 only
    offsets = neighbour_offsets(3, half=True)
    assert (0, 3) not in offsets
    row_2 = labels[0, offsets.index((0, 2)), 0].tolist()
    assert row_2 == [BACKGROUND_POSITIVE, BACKGROUND_POSITIVE, NEGATIVE, NEGATIVE, FOREGROUND_POSITIVE,
                     FOREGROUND_POSITIVE, IGNORED, IGNORED]


def test_affinity_is_one_for_equal_embeddings_and_symmetric():
    embeddings = torch.randn(1, 4, 5, 5)
    embeddings[..., 2, 2] = embeddings[..., 2, 3]
    forward = pair_affinities(embeddings, [(0, 1)])
    backward = pair_affinities(embeddings, [(0, -1)])
    assert forward[0, 0, 2, 2] == pytest.approx(1.0)
    assert torch.allclose(forward[0, 0, :, :-1], backward[0, 0, :, 1:])
    assert ((forward > 0) & (forward <= 1)).all()


def test_affinity_loss_is_minimal_when_embeddings_agree_with_the_labels():
    mask = torch.zeros(1, 6, 6, dtype=torch.long)
    mask[:, :, 3:] = 1
    perfect = torch.zeros(1, 2, 6, 6)
    perfect[:, :, :, 3:] = 50.0  # same class: equal embeddings; different: far apart
    terms = affinity_loss(perfect, mask, radius=3)
    assert terms["loss"].item() == pytest.approx(0.0, abs=1e-4)
    wrong = torch.zeros(1, 2, 6, 6)  # every pair looks alike, including the negatives
    assert affinity_loss(wrong, mask, radius=3)["neg"].item() > 5


def test_training_embeddings_on_the_loss_separates_regions():
    torch.manual_seed(0)
    mask = torch.zeros(2, 8, 8, dtype=torch.long)
    mask[:, 2:6, 2:6] = 1
    mask[:, 0, :] = IGNORED
    embeddings = torch.randn(2, 8, 8, 8, requires_grad=True)
    optimizer = torch.optim.Adam([embeddings], lr=0.1)
    first = None
    for _ in range(200):
        loss = affinity_loss(embeddings, mask, radius=3)["loss"]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 5
    inside_to_outside = pair_affinities(embeddings.detach(), [(0, 1)])[0, 0, 3, 5]  # (3,5) -> (3,6)
    inside_to_inside = pair_affinities(embeddings.detach(), [(0, 1)])[0, 0, 3, 3]
    assert inside_to_outside < 0.2 < 0.8 < inside_to_inside


def test_affinity_loss_without_pairs_of_a_kind_is_finite():
    mask = torch.full((1, 4, 4), IGNORED, dtype=torch.long)
    embeddings = torch.randn(1, 3, 4, 4, requires_grad=True)
    terms = affinity_loss(embeddings, mask, radius=2)
    terms["loss"].backward()
    assert terms["loss"].item() == 0.0 and torch.isfinite(embeddings.grad).all()


def test_transition_rows_sum_to_one_and_never_leave_the_image():
    weights, offsets = transition_weights(torch.randn(2, 3, 6, 7), radius=3, beta=8)
    assert torch.allclose(weights.sum(dim=1), torch.ones(2, 6, 7))
    corner = weights[0, :, 0, 0]
    outside = [i for i, (dy, dx) in enumerate(offsets) if dy < 0 or dx < 0]
    assert (corner[outside] == 0).all()


def _two_regions(height=6, width=10):
    """Embeddings of a left and a right region that have (numerically) zero affinity."""
    embeddings = torch.zeros(1, 2, height, width)
    embeddings[..., width // 2:] = 100.0
    embeddings[:, 1] += torch.linspace(0, 0.5, width)  # some texture inside each region
    return embeddings


def test_random_walk_spreads_inside_a_region_and_not_across_a_zero_affinity_edge():
    embeddings = _two_regions()
    weights, offsets = transition_weights(embeddings, radius=3, beta=10)
    cam = torch.zeros(1, 1, 6, 10)
    cam[0, 0, 2, 1] = 1.0
    walked = random_walk(cam, weights, offsets, iterations=100)[0, 0]
    left, right = walked[:, :5], walked[:, 5:]
    assert (left > 0).all() and (right == 0).all()
    assert left.max() / left.min() < 2  # spread, not left as a peak


def test_random_walk_conserves_mass_weighted_by_degree():
    # T = D^-1 A with A symmetric: sum_p d_p x_p is invariant (d_p the row sums of A^beta),
    # the CAM form of "a walker's probability is conserved".
    torch.manual_seed(0)
    embeddings = torch.rand(1, 3, 7, 9)
    radius, beta = 3, 4.0
    weights, offsets = transition_weights(embeddings, radius, beta)
    affinity = pair_affinities(embeddings, offsets).pow(beta)
    inside = weights > 0
    degree = (affinity * inside).sum(dim=1)
    maps = torch.rand(1, 2, 7, 9)
    walked = random_walk(maps, weights, offsets, iterations=20)
    assert torch.allclose((degree * walked).sum(dim=(-2, -1)), (degree * maps).sum(dim=(-2, -1)), rtol=1e-4)
    constant = random_walk(torch.ones(1, 1, 7, 9), weights, offsets, iterations=20)
    assert torch.allclose(constant, torch.ones_like(constant))


def test_one_walk_step_takes_each_pixels_weighted_mean_of_its_neighbours_image_by_image():
    torch.manual_seed(0)
    embeddings = torch.rand(2, 3, 5, 6)
    weights, offsets = transition_weights(embeddings, radius=3, beta=2.0, pairs="psa")
    maps = torch.rand(2, 2, 5, 6)
    stepped = random_walk(maps, weights, offsets, iterations=1)
    expected = torch.zeros_like(maps)
    for index, (dy, dx) in enumerate(offsets):
        for y in range(5):
            for x in range(6):
                if 0 <= y + dy < 5 and 0 <= x + dx < 6:
                    expected[:, :, y, x] += weights[:, index, y, x, None] * maps[:, :, y + dy, x + dx]
    assert torch.allclose(stepped, expected, atol=1e-6)
    alone = torch.cat([random_walk(maps[i:i + 1], weights[i:i + 1], offsets, 7) for i in range(2)])
    assert torch.allclose(random_walk(maps, weights, offsets, 7), alone, atol=1e-6)  # no mass across images


def test_walk_mask_combines_the_strong_and_the_weak_background_as_the_two_thresholds():
    scores = np.zeros((4, 2, 3), dtype=np.float32)
    scores[0] = [[1.0, 0.9, 0.1], [0.5, 0.7, 0.9]]  # strong background
    scores[1] = [[1.0, 0.2, 0.0], [0.1, 0.3, 0.9]]  # weak background
    scores[2] = [[0.0, 0.5, 0.8], [0.1, 0.6, 0.1]]  # class 4
    scores[3] = [[0.0, 0.0, 0.0], [0.9, 0.0, 0.2]]  # class 7
    cfg = RefineConfig(random_walk=RandomWalkConfig(rule="two_backgrounds", crf=False))
    mask = walk_mask(np.zeros((2, 3, 3), np.uint8), scores, np.array([4, 7]), cfg)
    # (0,1) and (1,1): background against the strong map, class 4 against the weak one: unsure
    assert mask.tolist() == [[0, IGNORED, 4], [7, IGNORED, 0]]


@pytest.mark.parametrize("stride, size", [(4, (24, 25)), (8, (12, 13))])
def test_affinitynet_gives_embeddings_at_its_feature_stride(stride, size):
    model = AffinityNet(BackboneConfig(name="resnet18", output_stride=16), stride, embedding_channels=32)
    assert model(torch.randn(2, 3, 96, 100)).shape == (2, 32) + size


@pytest.mark.parametrize("backbone, deep_conv",
                         [("resnet18", "backbone.body.layer2.0.conv1.weight"),
                          ("efficientnet_lite0", "backbone.body.layer2.0.conv_pw.weight")])
def test_affinitynet_trains_neither_its_fixed_batchnorm_nor_its_frozen_levels(backbone, deep_conv):
    """PSA's backbone: BatchNorm in eval mode with fixed parameters, the first blocks fixed."""
    torch.manual_seed(0)
    model = AffinityNet(BackboneConfig(name=backbone, output_stride=16), 8, 16,
                        freeze_batchnorm=True, frozen_levels=("stem", "layer1"))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    optimizer.step()
    after = model.state_dict()
    unchanged = {name for name in before if torch.equal(before[name], after[name])}
    assert {name for name in before
            if name.startswith(("backbone.body.stem.", "backbone.body.layer1."))} <= unchanged
    norms = {name for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)}
    # Weights, statistics.
    assert norms and {name for name in before if name.rsplit(".", 1)[0] in norms} <= unchanged
    assert deep_conv not in unchanged and "embed.0.weight" not in unchanged

    plain = AffinityNet(BackboneConfig(name=backbone, output_stride=16), 8, 16).train()
    assert all(m.training for m in plain.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(p.requires_grad for p in plain.parameters())


def test_walk_mask_argmax_rule_labels_every_pixel_with_the_highest_walked_score():
    scores = np.zeros((3, 2, 3), dtype=np.float32)
    scores[0] = [[0.9, 0.1, 0.1], [0.5, 0.2, 0.3]]  # walked background
    scores[1] = [[0.1, 0.5, 0.0], [0.6, 0.1, 0.1]]  # class 4
    scores[2] = [[0.0, 0.2, 0.8], [0.1, 0.3, 0.2]]  # class 7
    mask = walk_mask(np.zeros((2, 3, 3), np.uint8), scores, np.array([4, 7]), RefineConfig())
    assert mask.tolist() == [[0, 4, 7], [4, 7, 0]]


REFERENCE = Path(__file__).parent / "data" / "psa_walk_reference.npz"


@pytest.mark.parametrize("prefix, radius", [("", 3), ("r5_", 5)])
@pytest.mark.parametrize("logt", [3, 8])
def test_walk_matches_psa_reference_code(prefix, radius, logt):
    """The reference values were computed by PSA's own code (jiwoon-ahn/psa@9493e59) on CPU:
    ``tool/pyutils.py get_indices_of_pairs`` (imported), the pair affinities and the dense
    matrix with identity and transpose of ``network/resnet38_aff.py:50-73``, and the walk of
    ``infer_aff.py:96-118`` (background (1 - max)^16, A^8, column normalisation, logt
    squarings, ``cam @ T``), on seeded random features (4 channels) and CAMs of two classes
    at feature resolution; 6 x 7 at radius 3 and 12 x 14 at radius 5 (PSA's)."""
    reference = np.load(REFERENCE)
    features = torch.from_numpy(reference[prefix + "feat"])[None]
    cams = torch.from_numpy(reference[prefix + "cam_in"])[None]  # [(1 - max)^16, class 1, class 2]
    suffix = "_logt8" if logt == 8 else ""
    weights, offsets = transition_weights(features, radius, beta=8.0, pairs="psa")
    walked = random_walk(cams, weights, offsets, iterations=2 ** logt)[0].numpy()
    expected = reference[prefix + "cam_rw" + suffix]
    np.testing.assert_allclose(walked, expected, rtol=1e-4, atol=1e-6 * 2 ** logt)
    assert (walked.argmax(axis=0) == reference[prefix + "pred" + suffix]).all()
    # PSA's border pairs matter: with every pair inside the image the result is another one.
    weights_all, _ = transition_weights(features, radius, beta=8.0, pairs="all")
    assert np.abs(random_walk(cams, weights_all, offsets, 2 ** logt)[0].numpy() - expected).max() > 0.1


def test_psa_pairs_start_nowhere_near_the_left_right_and_bottom_borders():
    weights, offsets = transition_weights(torch.randn(1, 2, 8, 9), radius=3, beta=1.0, pairs="psa")
    right = offsets.index((0, 1))
    # (p, p + (0, 1)) starts at p: only columns 2..6 and rows 0..5 start pairs
    starts = (weights[0, right] > 0).nonzero().tolist()
    assert {y for y, _ in starts} == set(range(6)) and {x for _, x in starts} == set(range(2, 7))
    # its transpose, seen from p + (0, 1), goes left
    left = offsets.index((0, -1))
    assert ((weights[0, left] > 0).nonzero().tolist()
            == [[y, x + 1] for y, x in starts])
    assert torch.allclose(weights.sum(dim=1), torch.ones(1, 8, 9))


def test_pooled_labels_keep_a_region_that_fills_most_of_a_block_where_nearest_loses_it():
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, :4, :2] = 3     # 9 of the 16 pixels of the top-left 4x4 block, not its centre (2, 2)
    mask[0, 0, 2] = 3
    mask[0, 4:, 4:] = 255   # the bottom-right block is unsure
    pooled = downsample_mask(mask, (2, 2), "pool")
    assert pooled[0].tolist() == [[3, 0], [0, 255]]
    nearest = downsample_mask(mask, (2, 2), "nearest")
    assert nearest[0, 0, 0] == 0


def test_nearest_labels_are_the_block_centres_as_pil_resizes_irnet_labels():
    mask = torch.from_numpy(np.random.default_rng(0).integers(0, 5, (1, 12, 16)))
    expected = np.asarray(Image.fromarray(mask[0].numpy().astype(np.uint8)).resize((4, 3), Image.NEAREST))
    assert np.array_equal(downsample_mask(mask, (3, 4), "nearest")[0].numpy(), expected)


def test_affinity_loss_reports_the_mean_affinity_of_negative_pairs():
    embeddings = torch.zeros(1, 2, 4, 4)
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, :, 2:] = 1
    terms = affinity_loss(embeddings, mask, radius=2, label_downsample="nearest")
    assert terms["neg_affinity"].item() == pytest.approx(1.0)  # identical embeddings: affinity 1
    assert torch.isnan(affinity_loss(embeddings, torch.zeros_like(mask), radius=2)["neg_affinity"])


def test_psa_head_starts_with_distinct_embeddings_where_the_linear_head_starts_with_affinities_near_one():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    spreads = {}
    for head in ("psa", "bn_relu"):
        model = AffinityNet(BackboneConfig(name="resnet18", output_stride=16), 8, 64, head).eval()
        with torch.no_grad():
            affinity = pair_affinities(model(images), neighbour_offsets(5, half=True))
        spreads[head] = (affinity.min().item(), affinity.max().item())
    low, high = spreads["psa"]
    assert low < 0.1 and high > 0.4
    assert spreads["bn_relu"][0] > 0.5  # every pair starts looking alike


IRN_REFERENCE = Path(__file__).parent / "data" / "irn_walk_reference.npz"


def test_irn_walk_matches_irnet_reference_code():
    """The reference values were computed by IRNet's own code (jiwoon-ahn/irn@a2ece00) on CPU:
    ``misc/indexing.py propagate_to_edge`` unmodified (radius 5, beta 10, exp_times 3), then
    ``step/make_sem_seg_labels.py:44-49`` (division by the overall maximum, background 0.25,
    argmax), on a seeded random 6 x 7 boundary map and CAMs of two classes."""
    reference = np.load(IRN_REFERENCE)
    radius, beta, exp_times, bg_threshold = reference["params"]
    radius, exp_times = int(radius), int(exp_times)
    boundary = torch.from_numpy(reference["edge"])[None]
    offsets = walk_offsets(radius)
    weights = normalized_transitions(path_affinities(boundary, offsets), offsets, beta, radius, "all")
    walked = random_walk(torch.from_numpy(reference["cams"])[None] * (1 - boundary), weights, offsets,
                         2 ** exp_times)[0]
    np.testing.assert_allclose(walked.numpy(), reference["rw"][:, 0], rtol=1e-4, atol=1e-5)
    normalised = walked / walked.max()
    np.testing.assert_allclose(normalised.numpy(), reference["rw_norm"], rtol=1e-4, atol=1e-5)
    scores = torch.cat([torch.full_like(normalised[:1], bg_threshold), normalised])
    assert (scores.argmax(dim=0).numpy() == reference["pred"]).all()


def test_paths_run_between_the_two_pixels_and_are_symmetric():
    assert path_points(0, 3) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert path_points(2, 1) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    for dy, dx in neighbour_offsets(5, half=True):
        assert sorted((dy - y, dx - x) for y, x in path_points(dy, dx)) == sorted(path_points(dy, dx))


def test_a_boundary_between_two_pixels_cuts_their_affinity_and_leaving_the_image_cuts_it_too():
    boundary = torch.zeros(1, 1, 5, 6)
    boundary[..., 3] = 0.9  # a vertical wall in column 3
    offsets = [(0, 0), (0, 1), (0, 2), (0, -2)]
    affinity = path_affinities(boundary, offsets)[0]
    assert affinity[0, 2, 0] == 1.0  # itself
    assert affinity[1, 2, 0] == 1.0  # (2, 0) -> (2, 1): no wall between
    assert affinity[2, 2, 2] == pytest.approx(0.1)  # (2, 2) -> (2, 4) crosses the wall
    assert affinity[3, 2, 1] == 0.0  # (2, 1) -> (2, -1) leaves the image


def test_boundary_loss_is_low_for_a_boundary_on_the_label_edge_and_high_for_none():
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, :, 4:] = 1
    on_edge = torch.full((1, 1, 8, 8), 1e-4)
    on_edge[..., 3:5] = 1 - 1e-4
    none = torch.full((1, 1, 8, 8), 1e-4)
    assert boundary_loss(on_edge, mask, radius=3)["neg"] < 0.01 < boundary_loss(none, mask, radius=3)["neg"]


def test_boundary_net_trains_only_its_branch_with_a_frozen_backbone():
    model = BoundaryNet(BackboneConfig(name="resnet18", output_stride=16)).train()
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)  # running statistics stay as loaded
    assert all(not p.requires_grad for p in model.backbone.parameters())
    logits = model(torch.randn(2, 3, 64, 72))
    assert logits.shape == (2, 1, 16, 18)
    logits.mean().backward()
    assert all(p.grad is not None for p in model.new_parameters())


def test_psa_label_mask_takes_classes_from_the_strong_background_and_background_from_the_weak_one():
    # Without pairwise terms the CRF keeps each pixel's highest score, so PSA's rule is exact:
    # max CAM 0.9 beats (1 - 0.9)^4 and ^32: the class; 0.2 loses to 0.8^4 = 0.41 but beats
    # 0.8^32: unsure; 0.01 loses to both: background. An image without classes is background.
    cams = np.zeros((2, 2, 3), np.float32)
    cams[0] = [[0.9, 0.2, 0.01], [0.0, 0.1, 0.0]]
    cams[1] = [[0.1, 0.0, 0.0], [0.95, 0.15, 0.005]]
    cfg = AffinityNetConfig(label_crf=CrfConfig(gaussian_compat=0, bilateral_compat=0))
    image = np.zeros((2, 3, 3), np.uint8)
    assert psa_label_mask(image, cams, np.array([3, 5]), cfg).tolist() == [[3, IGNORED, 0], [5, IGNORED, 0]]
    assert psa_label_mask(image, cams[:0], np.array([], dtype=int), cfg).tolist() == [[0] * 3] * 2
