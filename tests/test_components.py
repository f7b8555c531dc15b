import numpy as np

from pipeline.methods.components import keep_largest_components, largest_components


def test_each_class_keeps_its_largest_blob_and_the_rest_turns_background():
    labels = np.zeros((6, 8), dtype=np.uint8)
    labels[0:3, 0:3] = 1  # 9 pixels
    labels[5, 7] = 1  # a stray pixel of class 1
    labels[4:6, 0:2] = 2  # class 2, one blob
    labels[0, 7] = 255  # unsure is left alone
    kept = largest_components(labels)
    assert kept[5, 7] == 0 and (kept[0:3, 0:3] == 1).all() and (kept[4:6, 0:2] == 2).all()
    assert kept[0, 7] == 255 and (kept == 1).sum() == 9


def test_diagonal_neighbours_are_not_connected():
    labels = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 0]], dtype=np.uint8)
    assert largest_components(labels).tolist() == [[0, 0, 0], [0, 1, 1], [0, 1, 0]]


def test_a_volume_keeps_a_small_slice_blob_that_touches_the_main_one_in_the_next_slice():
    first = np.zeros((4, 4), dtype=np.uint8)
    second = np.zeros((4, 4), dtype=np.uint8)
    first[0, 0] = 3  # alone in its slice, but above the big blob of the next slice
    second[0:3, 0:3] = 3
    second[3, 3] = 3  # stray: touches nothing in either slice
    masks = {"p1_slice_2": second, "p1_slice_1": first, "other": second.copy()}
    volume_of = {"p1_slice_1": ("p1", (1,)), "p1_slice_2": ("p1", (2,)), "other": None}.get
    kept = keep_largest_components(masks, volume_of)
    assert kept["p1_slice_1"][0, 0] == 3  # per 2-D image it would be the only blob anyway
    assert kept["p1_slice_2"][3, 3] == 0 and (kept["p1_slice_2"][0:3, 0:3] == 3).all()
    assert kept["other"][3, 3] == 0  # an image on its own: per image


def test_in_a_volume_the_largest_blob_is_counted_over_every_slice():
    # Per slice the stray blob would win in slice 2; over the volume the other one is larger.
    a = np.zeros((1, 6), dtype=np.uint8)
    b = np.zeros((1, 6), dtype=np.uint8)
    a[0, 0:2] = b[0, 0:2] = 1  # 4 voxels across two slices
    b[0, 3:6] = 1  # 3 voxels in slice 2 only
    kept = keep_largest_components({"s1": a, "s2": b}, {"s1": ("v", (1,)), "s2": ("v", (2,))}.get)
    assert kept["s2"].tolist() == [[1, 1, 0, 0, 0, 0]]
    assert largest_components(b).tolist() == [[0, 0, 0, 1, 1, 1]]  # per image the other way round
