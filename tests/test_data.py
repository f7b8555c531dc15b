import os
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, two_object_mask, write_voc_folder
from PIL import Image

from pipeline.core.config import TrainConfig
from pipeline.core.config_file import load_config
from pipeline.core.errors import DataError
from pipeline.core.io import save_mask
from pipeline.data.dataset import IGNORE, VOCDataset, score_ids
from pipeline.data.prepare import prepare_data
from pipeline.data.training_set import MEAN_COLOUR, TrainingSet, multi_hot, normalize
from pipeline.data.volumes import Volumes


def test_reader_derives_image_labels_from_masks(voc_folder):
    dataset = VOCDataset(voc_folder)
    assert dataset.classes == ["background", "cat", "dog"]
    assert dataset.split_ids("train") == ["a", "b", "empty"]
    np.testing.assert_array_equal(dataset.image_labels("a"), [1, 2])
    np.testing.assert_array_equal(dataset.image_labels("b"), [1])  # 255 is not a class
    assert dataset.image_labels("empty").size == 0
    assert dataset.load_image("a").shape == (32, 32, 3)
    np.testing.assert_array_equal(multi_hot(dataset.image_labels("a"), 3), [1.0, 1.0])
    dataset.validate("train", ["val"])


def test_grayscale_images_become_three_channels(tmp_path):
    root = write_voc_folder(tmp_path / "g", {"x": two_object_mask()}, gray=True)
    image = VOCDataset(root).load_image("x")
    assert image.shape == (32, 32, 3) and (image[..., 0] == image[..., 2]).all()


def test_missing_image_is_a_clear_error(voc_folder):
    (voc_folder / "JPEGImages" / "b.png").unlink()
    with pytest.raises(DataError, match="'b' has no image"):
        VOCDataset(voc_folder).validate("train", [])


def test_mask_size_mismatch_is_a_clear_error(voc_folder):
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(voc_folder / "SegmentationClass" / "a.png")
    with pytest.raises(DataError, match="a.png is 10x10 but its image a.png is 32x32"):
        VOCDataset(voc_folder).validate("train", [])


def test_colour_mask_is_a_clear_error(voc_folder):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(voc_folder / "SegmentationClass" / "a.png")
    with pytest.raises(DataError, match="a.png: a mask must be a palette or grayscale PNG"):
        VOCDataset(voc_folder).validate("train", [])


def test_unreadable_image_is_a_clear_error(voc_folder):
    (voc_folder / "JPEGImages" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="b.png cannot be decoded"):
        VOCDataset(voc_folder).validate("train", [])


def test_class_index_beyond_classes_txt_is_an_error(voc_folder):
    mask = two_object_mask(cls_b=7)
    Image.fromarray(mask, mode="L").save(voc_folder / "SegmentationClass" / "a.png")
    with pytest.raises(DataError, match="class index 7"):
        VOCDataset(voc_folder).validate("train", [])


@pytest.mark.parametrize("remove, message", [
    ("classes.txt", "classes.txt is missing"),
    ("ImageSets/Segmentation/val.txt", "val.txt does not exist"),
])
def test_layout_problems_name_the_file(voc_folder, remove, message):
    (voc_folder / remove).unlink()
    with pytest.raises(DataError, match=message):
        VOCDataset(voc_folder).validate("train", ["val"])


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        VOCDataset(tmp_path / "nowhere")


def test_training_crops_keep_masks_nearest_neighbour_and_pad_with_ignore(voc_folder):
    dataset = VOCDataset(voc_folder)
    train_set = TrainingSet(dataset, ["a", "empty"], TrainConfig(crop_size=48, scale_range=[0.7, 1.3]),
                            pixel_labels={"mask": dataset.load_mask})
    torch.manual_seed(0)
    for _ in range(10):
        for index in range(2):
            item = train_set[index]
            assert item["image"].shape == (3, 48, 48)
            assert item["mask"].shape == (48, 48)
            # Nearest-neighbour resizing: no interpolated in-between class values.
            assert set(item["mask"].unique().tolist()) <= {0, 1, 2, IGNORE}
            assert (item["mask"] == IGNORE).any()  # 32 or 40 px images padded to 48
            # Padding is zero in the normalised image exactly where the mask is 'ignore'.
            padded = item["mask"] == IGNORE
            assert item["image"][:, padded].abs().max() == 0


def test_rotation_turns_image_and_masks_together_and_fills_corners_as_padding(voc_folder):
    """Each item is PIL's rotation of the (possibly flipped) image and mask by the angle drawn
    for it: bilinear with the mean colour in the corners for the image, the nearest label with
    'ignore' for the mask."""
    dataset = VOCDataset(voc_folder)
    augment = TrainConfig(crop_size=32, scale_range=[1.0, 1.0], rotation=45.0)  # "a" is 32x32: no crop
    turned = TrainingSet(dataset, ["a"], augment, pixel_labels={"mask": dataset.load_mask})
    for seed in range(6):
        torch.manual_seed(seed)
        torch.rand(())  # the scale
        flip = torch.rand(()).item() < 0.5
        angle = (2 * torch.rand(()).item() - 1) * 45.0
        image, mask = Image.fromarray(dataset.load_image("a")), Image.fromarray(dataset.load_mask("a"))
        if flip:
            image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        expected_mask = torch.from_numpy(np.array(mask.rotate(angle, Image.NEAREST, fillcolor=IGNORE))).long()
        expected_image = normalize(np.array(image.rotate(angle, Image.BILINEAR, fillcolor=MEAN_COLOUR)))
        torch.manual_seed(seed)
        item = turned[0]
        assert abs(angle) > 1 and torch.equal(item["mask"], expected_mask)
        assert torch.allclose(item["image"], expected_image)
        corners = item["mask"] == IGNORE
        assert corners.any() and item["image"][:, corners].abs().max() < 0.02  # the mean colour, as padding


def test_fingerprint_changes_when_a_file_changes(voc_folder):
    before = VOCDataset(voc_folder).fingerprint("train")
    assert VOCDataset(voc_folder).fingerprint("train") == before
    save_path = voc_folder / "SegmentationClass" / "a.png"
    mask = np.array(Image.open(save_path))
    mask[0, 0] = 2
    Image.fromarray(mask, mode="L").save(save_path)
    assert VOCDataset(voc_folder).fingerprint("train") != before


def test_fingerprint_ignores_mtimes(voc_folder, tmp_path):
    """A copied or re-synced data folder (new mtimes, same bytes) keeps every stage cached."""
    before = VOCDataset(voc_folder).fingerprint("train", ["val"])
    copy = tmp_path / "copy"
    shutil.copytree(voc_folder, copy)  # copytree keeps mtimes: set new ones
    for path in copy.rglob("*"):
        os.utime(path, ns=(1, 1))
    assert VOCDataset(copy).fingerprint("train", ["val"]) == before


def _voc12_like(tmp_path, with_aug=True):
    """A VOC-shaped folder: train (2 ids) inside train_aug (3 ids) and, optionally, the SBD extras."""
    masks = {"2007_000032": two_object_mask(), "2007_000039": two_object_mask(cls_b=1),
             "2008_000002": two_object_mask(cls_a=2)}
    root = write_voc_folder(tmp_path / "VOC2012", {k: masks[k] for k in ("2007_000032", "2007_000039")},
                            splits={"train": ["2007_000032", "2007_000039"], "val": ["2007_000039"]})
    # The third image exists only in the augmented set.
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "JPEGImages" / "2008_000002.jpg")
    if with_aug:
        (root / "SegmentationClassAug").mkdir()
        for image_id, mask in masks.items():
            save_mask(root / "SegmentationClassAug" / f"{image_id}.png", mask)
        (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(masks) + "\n")
    return root


def _voc12_config(root, *overrides):
    sets = [f"data.root={root}", "cam.train.batch_size=2", "seg.train.batch_size=2"] + list(overrides)
    return load_config(ROOT / "configs" / "voc12.yaml", sets)


def test_voc12_trains_on_train_aug_and_scores_on_train(tmp_path):
    cfg = _voc12_config(_voc12_like(tmp_path))
    dataset = prepare_data(cfg)
    assert (cfg.data.train_split, cfg.data.train_masks) == ("train_aug", "SegmentationClassAug")
    assert len(dataset.split_ids(cfg.data.train_split)) == 3
    assert score_ids(cfg.data, dataset) == {"2007_000032", "2007_000039"}
    np.testing.assert_array_equal(dataset.image_labels("2008_000002"), [2])  # from SegmentationClassAug
    assert dataset.load_train_mask("2008_000002").max() == 2


def test_voc12_falls_back_to_train_without_the_augmented_set(tmp_path, capsys):
    cfg = _voc12_config(_voc12_like(tmp_path, with_aug=False))
    dataset = prepare_data(cfg)
    assert (cfg.data.train_split, cfg.data.train_masks) == ("train", "SegmentationClass")
    assert "training on split 'train'" in capsys.readouterr().err
    assert dataset.split_ids(cfg.data.train_split) == ["2007_000032", "2007_000039"]


def test_without_a_fallback_a_missing_train_split_is_an_error(tmp_path):
    cfg = _voc12_config(_voc12_like(tmp_path, with_aug=False), "data.fallback_train_split=null")
    with pytest.raises(DataError, match="train_aug.txt does not exist"):
        prepare_data(cfg)


def test_irnet_cls_labels_file_gives_the_image_labels(tmp_path):
    root = _voc12_like(tmp_path)
    classes = 2  # cat, dog
    table = {2007000032: np.array([1, 1], np.float32), 2007000039: np.array([1, 0], np.float32),
             "2008_000002": np.array([0, 1], np.float32)}
    np.save(root / "cls_labels.npy", table)
    with pytest.raises(DataError, match="cls_labels.npy is a pickle, and loading a pickle can run code: "
                                        "set data.allow_pickle: true"):
        prepare_data(_voc12_config(root, "data.image_labels=cls_labels.npy"))
    dataset = prepare_data(_voc12_config(root, "data.image_labels=cls_labels.npy", "data.allow_pickle=true"))
    np.testing.assert_array_equal(dataset.image_labels("2007_000032"), [1, 2])
    np.testing.assert_array_equal(dataset.image_labels("2008_000002"), [2])
    np.save(root / "bad_labels.npy", {"2007_000032": np.ones(classes + 3)})
    with pytest.raises(DataError, match="bad_labels.npy: labels of '2007_000032' have 5 entries, expected 2"):
        prepare_data(_voc12_config(root, "data.image_labels=bad_labels.npy", "data.allow_pickle=true"))


def test_score_split_outside_the_train_split_is_an_error(tmp_path):
    root = _voc12_like(tmp_path)
    with pytest.raises(DataError, match="data.score_split 'train_aug' lists 1 ids outside "
                                        "data.train_split 'train', e.g. '2008_000002'"):
        prepare_data(_voc12_config(root, "data.train_split=train", "data.train_masks=SegmentationClass",
                                   "data.score_split=train_aug"))


SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("name, num_classes", [("msrc", 17), ("acdc", 4)])
def test_real_data_configs_read_their_data_set(name, num_classes):
    root = SHARED / f"{name}-dev"
    if not root.is_dir():
        pytest.skip(f"{root} is not here; a fresh clone has no ../shared")
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"data.root={root}"])
    dataset = prepare_data(cfg)
    assert dataset.num_classes == num_classes
    train_ids = dataset.split_ids(cfg.data.train_split)
    val_ids = set(dataset.split_ids(cfg.data.val_split))
    assert train_ids and val_ids and not set(train_ids) & val_ids
    image = dataset.load_image(train_ids[0])
    assert image.ndim == 3 and image.shape[2] == 3
    assert image.shape[:2] == dataset.load_mask(train_ids[0]).shape


def test_grayscale_images_become_three_equal_channels_and_masks_stay_class_indices(tmp_path):
    mask = two_object_mask(size=37)
    mask[0, :] = IGNORE
    root = write_voc_folder(tmp_path / "gray", {"g": mask}, gray=True)
    dataset = VOCDataset(root)
    image = dataset.load_image("g")
    assert image.shape == (37, 37, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    torch.manual_seed(0)
    train_set = TrainingSet(dataset, ["g"], TrainConfig(crop_size=24, scale_range=[0.6, 1.7]),
                            pixel_labels={"mask": dataset.load_mask})
    for _ in range(10):  # every rescale keeps labels from the original set: nearest-neighbour
        assert set(torch.unique(train_set[0]["mask"]).tolist()) <= {0, 1, 2, IGNORE}


def _slices_folder(tmp_path, sizes):
    """Slices named like ACDC's (patient001_frame01_slice_N), all in train and val."""
    masks = {f"patient001_frame01_slice_{k}": np.zeros(size, np.uint8) for k, size in enumerate(sizes)}
    return write_voc_folder(tmp_path / "slices", masks)


def _slice_config(root, *overrides):
    return load_config(ROOT / "configs" / "acdc.yaml",
                       [f"data.root={root}", "cam.train.batch_size=2", "seg.train.batch_size=2",
                        "refine.workers=1"] + list(overrides))


def test_volumes_group_slices_in_natural_order_and_take_their_spacing(tmp_path):
    root = _slices_folder(tmp_path, [(8, 8)] * 3)
    cfg = _slice_config(root)
    dataset = prepare_data(cfg)
    volumes = Volumes(cfg.data, root)
    assert volumes("patient001_frame01_slice_2") == ("patient001_frame01",
                                                     ("patient", 1, "_frame", 1, "_slice_", 2, ""))
    assert volumes("patient001_frame01_slice_10")[1] > volumes("patient001_frame01_slice_9")[1]
    assert volumes.spacing(dataset.split_ids("val")) == {}
    (root / "spacing.csv").write_text("volume,slice,row,column\npatient001_frame01,10,1.5,1.5\n")
    cfg = _slice_config(root, "data.spacing_file=spacing.csv")
    prepare_data(cfg)
    spacing = Volumes(cfg.data, root).spacing(["patient001_frame01_slice_0"])
    assert spacing == {"patient001_frame01": (10.0, 1.5, 1.5)}


@pytest.mark.parametrize("sizes, overrides, message", [
    ([(8, 8), (8, 9)], [], r"slices 'patient001_frame01_slice_0' \(8x8\) and 'patient001_frame01_slice_1' "
                           r"\(9x8\) of volume 'patient001_frame01' differ in size"),
    ([(8, 8)], ["data.volume_pattern=^case\\d+"],
     r"id 'patient001_frame01_slice_0' does not match data.volume_pattern"),
    ([(8, 8)], ["data.spacing_file=none.csv"], r"spacing file .*none.csv does not exist"),
])
def test_volume_problems_stop_before_any_work(tmp_path, sizes, overrides, message):
    root = _slices_folder(tmp_path, sizes)
    with pytest.raises(DataError, match=message):
        prepare_data(_slice_config(root, *overrides))


def test_volume_scoring_keys_leave_cam_and_refine_cached(tmp_path):
    from pipeline.core.cache import cache_key, training_key
    from stages import expected_inputs

    root = _slices_folder(tmp_path, [(8, 8)] * 2)
    before, after = (_slice_config(root, *extra) for extra in ([], ["data.volume_pattern=null"]))
    for cfg in (before, after):
        prepare_data(cfg)
    for stage, same in (("cam", True), ("refine", True), ("seg", False)):
        assert (cache_key(expected_inputs(before, stage)) == cache_key(expected_inputs(after, stage))) == same
    # seg scores differently, but its network is the same: it rescores, it does not retrain
    assert training_key(expected_inputs(before, "seg")) == training_key(expected_inputs(after, "seg"))
