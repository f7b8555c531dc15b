import numpy as np
import pytest

from pipeline.core.config import RegionsConfig
from pipeline.methods.regions import image_regions, vote_in_regions


def test_a_mostly_sure_region_takes_its_most_frequent_sure_label_and_a_mostly_unsure_one_turns_unsure():
    regions = np.array([[0, 0, 0, 0, 1, 1, 1, 1]])
    mask = np.array([[3, 3, 255, 1, 255, 255, 255, 2]], dtype=np.uint8)
    # region 0: 3 sure of 4, label 3 twice; region 1: 3 unsure of 4
    assert vote_in_regions(mask, regions).tolist() == [[3, 3, 3, 3, 255, 255, 255, 255]]
    # exactly half unsure stays sure: unsure needs a majority
    half = np.array([[255, 255, 4, 4, 0, 0, 0, 255]], dtype=np.uint8)
    assert vote_in_regions(half, regions).tolist() == [[4, 4, 4, 4, 0, 0, 0, 0]]


def test_a_mask_with_no_unsure_pixel_or_no_sure_pixel_votes_as_well():
    regions = np.array([[0, 0, 1, 1]])
    assert vote_in_regions(np.array([[2, 2, 5, 0]], dtype=np.uint8), regions).tolist() == [[2, 2, 0, 0]]
    unsure = np.full((1, 4), 255, dtype=np.uint8)
    assert vote_in_regions(unsure, regions).tolist() == unsure.tolist()


def test_vote_refuses_regions_of_another_size():
    with pytest.raises(ValueError, match="differ in size"):
        vote_in_regions(np.zeros((2, 3), dtype=np.uint8), np.zeros((3, 2), dtype=np.int64))


def test_regions_end_at_a_colour_edge_and_snap_a_label_that_overshoots_it():
    rng = np.random.default_rng(0)
    image = np.full((40, 60, 3), 40, dtype=np.uint8)
    image[:, 30:] = 200  # an object on the right half
    image = (image + rng.integers(0, 6, image.shape)).astype(np.uint8)  # a little sensor noise
    regions = image_regions(image, RegionsConfig(enabled=True))
    assert not set(np.unique(regions[:, :30])) & set(np.unique(regions[:, 30:]))  # none straddles it
    # The smoothing (sigma 0.8) blurs the edge into thin regions of its own, a pixel or two wide.
    assert len(np.unique(regions[:, :26])) == 1 and len(np.unique(regions[:, 34:])) == 1
    overshoot = np.zeros((40, 60), dtype=np.uint8)
    overshoot[:, 18:] = 7  # the label leaks 12 pixels past the edge into the background
    snapped = vote_in_regions(overshoot, regions)
    assert (snapped[:, :26] == 0).all() and (snapped[:, 30:] == 7).all()
    short = np.full((40, 60), 255, dtype=np.uint8)
    short[:, :20] = 0
    short[:, 40:] = 7  # the label stops 10 pixels short of the edge, unsure between
    snapped = vote_in_regions(short, regions)
    assert (snapped[:, :26] == 0).all() and (snapped[:, 34:] == 7).all()
