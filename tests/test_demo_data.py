"""Behavioural tests of the synthetic VOC-style demo data set."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.demo import DEMO_CLASSES, generate_demo_dataset

NUM_CLASSES = len(DEMO_CLASSES)
SMALL = dict(num_train=20, num_val=8, min_size=64, max_size=80, seed=3)


def _split_ids(root: pathlib.Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _all_files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _labels(root: pathlib.Path) -> list[np.ndarray]:
    ids = _split_ids(root, "train") + _split_ids(root, "val")
    return [np.array(Image.open(root / "SegmentationClass" / f"{i}.png")) for i in ids]


def _run_lengths(mask: np.ndarray) -> np.ndarray:
    """For every True pixel, the length of the horizontal run of True pixels it lies in."""
    widths = np.zeros(mask.shape, dtype=int)
    for y, row in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        for start, stop in zip(edges[::2], edges[1::2]):
            widths[y, start:stop] = stop - start
    return widths


def _has_thin_vertical_part(mask: np.ndarray, max_width: int = 3, min_length: int = 8) -> bool:
    """True if the mask has a strip at most `max_width` px wide and at least `min_length` px tall."""
    thin = mask & (_run_lengths(mask) <= max_width)
    return bool((_run_lengths(thin.T) >= min_length).any())


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("small") / "demo"
    generate_demo_dataset(root, **SMALL)
    return root


@pytest.fixture(scope="module")
def larger_labels(tmp_path_factory) -> list[np.ndarray]:
    root = tmp_path_factory.mktemp("larger")
    generate_demo_dataset(root, num_train=100, num_val=20, min_size=64, max_size=96, seed=11)
    return _labels(root)


def test_layout_and_formats(small_set: pathlib.Path):
    root = small_set
    assert (root / "classes.txt").read_text().splitlines() == DEMO_CLASSES
    train, val = _split_ids(root, "train"), _split_ids(root, "val")
    assert len(train) == SMALL["num_train"] and len(val) == SMALL["num_val"]
    assert train[0] == "train_0000" and val[0] == "val_0000"
    assert {p.stem for p in (root / "JPEGImages").glob("*.jpg")} == set(train + val)
    assert {p.stem for p in (root / "SegmentationClass").glob("*.png")} == set(train + val)
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]

    for image_id in train + val:
        image = Image.open(root / "JPEGImages" / f"{image_id}.jpg")
        mask = Image.open(root / "SegmentationClass" / f"{image_id}.png")
        assert image.format == "JPEG" and image.mode == "RGB"
        assert mask.format == "PNG" and mask.mode == "P"
        assert image.size == mask.size
        assert all(SMALL["min_size"] <= s <= SMALL["max_size"] for s in image.size)
        assert set(np.unique(np.array(mask))) <= set(range(NUM_CLASSES))
        palette = np.array(mask.getpalette()).reshape(-1, 3)
        assert tuple(palette[1]) == (128, 0, 0) and tuple(palette[255]) == (224, 224, 192)


def test_same_seed_gives_identical_bytes(small_set: pathlib.Path, tmp_path: pathlib.Path):
    generate_demo_dataset(tmp_path, **SMALL)
    assert _all_files(tmp_path) == _all_files(small_set)


def test_different_seed_gives_different_images(small_set: pathlib.Path, tmp_path: pathlib.Path):
    generate_demo_dataset(tmp_path, **{**SMALL, "seed": SMALL["seed"] + 1})
    ids = _split_ids(small_set, "train")
    same = [(tmp_path / "JPEGImages" / f"{i}.jpg").read_bytes()
            == (small_set / "JPEGImages" / f"{i}.jpg").read_bytes() for i in ids]
    assert not any(same)


def test_train_images_do_not_depend_on_num_val(small_set: pathlib.Path, tmp_path: pathlib.Path):
    generate_demo_dataset(tmp_path, **{**SMALL, "num_val": 3})
    files = _all_files(tmp_path)
    reference = _all_files(small_set)
    for image_id in _split_ids(small_set, "train") + ["val_0000", "val_0002"]:
        for name in (f"JPEGImages/{image_id}.jpg", f"SegmentationClass/{image_id}.png"):
            assert files[name] == reference[name], name


def test_interrupted_generation_leaves_no_completion_marker(tmp_path: pathlib.Path):
    # A stale marker from an earlier run must not survive a failed rewrite.
    (tmp_path / "classes.txt").write_text("stale\n")
    (tmp_path / "JPEGImages" / "train_0005.jpg").mkdir(parents=True)  # makes writing that image fail
    with pytest.raises(OSError):
        generate_demo_dataset(tmp_path, **SMALL)
    assert not (tmp_path / "classes.txt").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]

    (tmp_path / "JPEGImages" / "train_0005.jpg").rmdir()
    generate_demo_dataset(tmp_path, **SMALL)
    assert (tmp_path / "classes.txt").read_text().splitlines() == DEMO_CLASSES


def test_every_class_appears_with_balanced_frequency(larger_labels: list[np.ndarray]):
    present = np.array([[(label == c).any() for c in range(1, NUM_CLASSES)] for label in larger_labels])
    frequency = present.mean(axis=0)
    assert (frequency >= 0.1).all() and (frequency <= 0.4).all(), dict(zip(DEMO_CLASSES[1:], frequency))
    empty = ~present.any(axis=1)
    assert 0 < empty.sum() <= 0.2 * len(larger_labels)
    assert all(set(np.unique(label)) <= set(range(NUM_CLASSES)) for label in larger_labels)


@pytest.mark.parametrize("name", ["lamp", "table"])
def test_thin_classes_have_thin_parts(larger_labels: list[np.ndarray], name: str):
    cls = DEMO_CLASSES.index(name)
    masks = [label == cls for label in larger_labels if (label == cls).any()]
    thin = [_has_thin_vertical_part(m) for m in masks]
    # Poles and legs are 1-3 px wide and tall; occlusion may hide a few.
    assert sum(thin) >= 0.5 * len(masks), f"{sum(thin)} of {len(masks)} {name} masks have a thin part"


def test_thin_part_check_rejects_thick_shapes():
    bar = np.zeros((30, 30), dtype=bool)
    bar[5:25, 10:14] = True  # 4 px wide
    assert not _has_thin_vertical_part(bar)
    bar[5:25, 20:23] = True  # 3 px wide
    assert _has_thin_vertical_part(bar)


def test_balls_are_small(larger_labels: list[np.ndarray]):
    ball = DEMO_CLASSES.index("ball")
    fractions = [(label == ball).mean() for label in larger_labels if (label == ball).any()]
    assert fractions and max(fractions) < 0.02


def test_confusable_objects_are_sometimes_large(larger_labels: list[np.ndarray]):
    big_classes = [DEMO_CLASSES.index(n) for n in ("bus", "house", "plate", "tile")]
    extents = []
    for label in larger_labels:
        for cls in big_classes:
            ys, xs = np.nonzero(label == cls)
            if len(ys):
                extents.append(max(np.ptp(ys) / label.shape[0], np.ptp(xs) / label.shape[1]))
    assert max(extents) >= 0.5


@pytest.mark.parametrize("overrides", [
    {"num_train": 0}, {"num_val": 0}, {"min_size": 15, "max_size": 64},
    {"min_size": 80, "max_size": 64}, {"seed": -1},
])
def test_invalid_arguments_raise(tmp_path: pathlib.Path, overrides: dict):
    with pytest.raises(ValueError):
        generate_demo_dataset(tmp_path, **{**SMALL, **overrides})
