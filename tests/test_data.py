import numpy as np
import pytest
import torch
from PIL import Image

from conftest import two_object_mask, write_voc_folder
from pipeline.data import IGNORE, TrainingSet, VOCDataset, multi_hot
from pipeline.errors import DataError


def test_reader_derives_image_labels_from_masks(voc_folder):
    dataset = VOCDataset(voc_folder)
    assert dataset.classes == ["background", "cat", "dog"]
    assert dataset.split_ids("train") == ["a", "b", "empty"]
    np.testing.assert_array_equal(dataset.image_labels("a"), [1, 2])
    np.testing.assert_array_equal(dataset.image_labels("b"), [1])  # 255 is not a class
    assert dataset.image_labels("empty").size == 0
    assert dataset.load_image("a").shape == (32, 32, 3)
    np.testing.assert_array_equal(multi_hot(dataset.image_labels("a"), 3), [1.0, 1.0])
    dataset.validate(["train", "val"])


def test_grayscale_images_become_three_channels(tmp_path):
    root = write_voc_folder(tmp_path / "g", {"x": two_object_mask()}, gray=True)
    image = VOCDataset(root).load_image("x")
    assert image.shape == (32, 32, 3) and (image[..., 0] == image[..., 2]).all()


def test_missing_image_is_a_clear_error(voc_folder):
    (voc_folder / "JPEGImages" / "b.png").unlink()
    with pytest.raises(DataError, match="'b' has no image"):
        VOCDataset(voc_folder).validate(["train"])


def test_mask_size_mismatch_is_a_clear_error(voc_folder):
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(voc_folder / "SegmentationClass" / "a.png")
    with pytest.raises(DataError, match="a.png is 10x10 but its image is 32x32"):
        VOCDataset(voc_folder).validate(["train"])


def test_colour_mask_is_a_clear_error(voc_folder):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(voc_folder / "SegmentationClass" / "a.png")
    with pytest.raises(DataError, match="a.png: a mask must be a palette or grayscale PNG"):
        VOCDataset(voc_folder).validate(["train"])


def test_unreadable_image_is_a_clear_error(voc_folder):
    (voc_folder / "JPEGImages" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="b.png is not a readable image"):
        VOCDataset(voc_folder).validate(["train"])


def test_class_index_beyond_classes_txt_is_an_error(voc_folder):
    mask = two_object_mask(cls_b=7)
    Image.fromarray(mask, mode="L").save(voc_folder / "SegmentationClass" / "a.png")
    with pytest.raises(DataError, match="class index 7"):
        VOCDataset(voc_folder).validate(["train"])


@pytest.mark.parametrize("remove, message", [
    ("classes.txt", "classes.txt is missing"),
    ("ImageSets/Segmentation/val.txt", "val.txt does not exist"),
])
def test_layout_problems_name_the_file(voc_folder, remove, message):
    (voc_folder / remove).unlink()
    with pytest.raises(DataError, match=message):
        VOCDataset(voc_folder).validate(["train", "val"])


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        VOCDataset(tmp_path / "nowhere")


def test_training_crops_keep_masks_nearest_neighbour_and_pad_with_ignore(voc_folder):
    dataset = VOCDataset(voc_folder)
    train_set = TrainingSet(dataset, ["a", "empty"], crop_size=48, scale_range=[0.7, 1.3],
                            pixel_labels=dataset.load_mask)
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


def test_fingerprint_changes_when_a_file_changes(voc_folder):
    before = VOCDataset(voc_folder).fingerprint(["train"])
    assert VOCDataset(voc_folder).fingerprint(["train"]) == before
    save_path = voc_folder / "SegmentationClass" / "a.png"
    mask = np.array(Image.open(save_path))
    mask[0, 0] = 2
    Image.fromarray(mask, mode="L").save(save_path)
    assert VOCDataset(voc_folder).fingerprint(["train"]) != before
