"""Data sets in the PASCAL VOC folder layout, and the training-time augmentation.

Layout (the demo generator writes it, real data sets come in it)::

    <root>/JPEGImages/<id>.jpg|png        RGB or grayscale image
    <root>/SegmentationClass/<id>.png     uint8 class index per pixel, 255 = unlabelled
    <root>/ImageSets/Segmentation/<split>.txt   one id per line
    <root>/classes.txt                    class names, line number = class index, 0 = background

Image-level labels are the foreground classes present in an image's mask.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from pipeline.errors import ConfigError, DataError
from pipeline.demo_data import generate_demo_dataset
from pipeline.io import atomic_write_json, file_digest, load_mask

IGNORE = 255
BACKGROUND = 0  # class 0 of every data set (classes.txt names it first)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Images are normalised with the ImageNet statistics whatever the initialisation, so
# pretrained and random backbones see the same input range.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class VOCDataset:
    """Read access to one data folder; every path problem is a one-line DataError.

    ``train_masks`` is the folder of the train split's masks (VOC: SegmentationClassAug for
    train_aug); ground truth for scoring always comes from SegmentationClass.
    ``image_labels_file`` optionally gives the image-level labels (IRNet's cls_labels.npy).
    """

    def __init__(self, root: str | Path, train_masks: str = "SegmentationClass",
                 image_labels_file: Optional[str] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist (config key data.root)")
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", train_masks):
            if not (self.root / sub).is_dir():
                raise DataError(f"data folder {self.root} has no {sub}/ (expected the VOC layout, see README)")
        classes_file = self.root / "classes.txt"
        if not classes_file.is_file():
            raise DataError(f"{classes_file} is missing: one class name per line, background first")
        self.classes = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
        if len(self.classes) < 2:
            raise DataError(f"{classes_file} must name the background and at least one class")
        self.train_masks = train_masks
        self.image_labels_path = self.root / image_labels_file if image_labels_file else None
        self._file_labels = (_read_label_file(self.image_labels_path, len(self.classes))
                             if self.image_labels_path else None)
        self._labels: dict[str, np.ndarray] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split_ids(self, split: str) -> list[str]:
        path = self.split_path(split)
        if not path.is_file():
            raise DataError(f"split file {path} does not exist (config keys data.train_split / data.val_split)")
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(f"split file {path} lists no ids")
        return ids

    def split_path(self, split: str) -> Path:
        return self.root / "ImageSets" / "Segmentation" / f"{split}.txt"

    def image_path(self, image_id: str) -> Path:
        for suffix in IMAGE_SUFFIXES:
            path = self.root / "JPEGImages" / f"{image_id}{suffix}"
            if path.is_file():
                return path
        raise DataError(f"id {image_id!r} has no image JPEGImages/{image_id}.jpg|png in {self.root}")

    def mask_path(self, image_id: str, folder: str = "SegmentationClass") -> Path:
        path = self.root / folder / f"{image_id}.png"
        if not path.is_file():
            raise DataError(f"id {image_id!r} has no mask {path}")
        return path

    def load_image(self, image_id: str) -> np.ndarray:
        """HxWx3 uint8; grayscale images are replicated to three channels (so ImageNet
        backbones take them unchanged)."""
        with Image.open(self.image_path(image_id)) as image:
            return np.array(image.convert("RGB"))

    def load_mask(self, image_id: str) -> np.ndarray:
        """Ground truth, for scoring."""
        return load_mask(self.mask_path(image_id))

    def load_train_mask(self, image_id: str) -> np.ndarray:
        """The training mask of a train-split id (full mode's pixel labels)."""
        return load_mask(self.mask_path(image_id, self.train_masks))

    def image_labels(self, image_id: str) -> np.ndarray:
        """Sorted foreground class indices (1..C-1) of a train-split id."""
        if self._file_labels is not None:
            for key in (image_id, image_id.replace("_", "")):  # IRNet keys VOC ids as integers
                if key in self._file_labels:
                    return self._file_labels[key]
            raise DataError(f"{self.image_labels_path} has no labels for id {image_id!r}")
        if image_id not in self._labels:
            self._labels[image_id] = self._classes_in(self.mask_path(image_id, self.train_masks))
        return self._labels[image_id]

    def checked_values(self, path: Path) -> np.ndarray:
        """The sorted values in a mask file, checked to be class indices of classes.txt or 255."""
        try:
            present = np.unique(load_mask(path))
        except ValueError as error:  # e.g. an RGB mask instead of class indices
            raise DataError(str(error)) from None
        bad = present[(present >= self.num_classes) & (present != IGNORE)]
        if bad.size:
            raise DataError(f"mask {path} has class index {int(bad[0])}, "
                            f"but classes.txt names only {self.num_classes} classes")
        return present

    def _classes_in(self, path: Path) -> np.ndarray:
        present = self.checked_values(path)
        return present[(present != BACKGROUND) & (present != IGNORE)].astype(np.int64)

    def validate(self, train_split: str, scored_splits: list[str]) -> None:
        """Checks every listed id: image present, mask present, same size, valid indices."""
        for split, folder in [(train_split, self.train_masks)] + [(s, "SegmentationClass") for s in scored_splits]:
            for image_id in self.split_ids(split):
                width, height = image_size(self.image_path(image_id))
                mask = self.mask_path(image_id, folder)
                mask_size = image_size(mask)
                if (width, height) != mask_size:
                    raise DataError(f"mask {mask} is {mask_size[0]}x{mask_size[1]} "
                                    f"but its image is {width}x{height}")
                classes = self._classes_in(mask)
                if split != train_split:
                    continue
                if self._file_labels is None:
                    self._labels[image_id] = classes  # what image_labels would read from the same mask
                else:
                    self.image_labels(image_id)  # the label file must cover every train id

    def fingerprint(self, train_split: Optional[str] = None, scored_splits: list[str] = ()) -> str:
        """Identifies the data a stage reads: split lists and the contents of every image and
        mask (training masks for the train split, ground truth for scored splits) and of the
        image-label file."""
        digest = hashlib.sha256(f"{self.classes}:{self.train_masks}".encode())
        if self.image_labels_path is not None:
            digest.update(f"labels:{file_digest(self.image_labels_path)}".encode())
        parts = ([(train_split, self.train_masks)] if train_split else []) + \
            [(split, "SegmentationClass") for split in scored_splits]
        for split, folder in parts:
            ids = self.split_ids(split)
            digest.update(f"{split}:{folder}:{','.join(ids)}".encode())
            for image_id in ids:
                for path in (self.image_path(image_id), self.mask_path(image_id, folder)):
                    digest.update(f"{path.name}:{file_digest(path)}".encode())
        return digest.hexdigest()[:16]


def _read_label_file(path: Path, num_classes: int) -> dict[str, np.ndarray]:
    """IRNet's cls_labels.npy: a pickled dict from id to a multi-hot vector over the C-1
    foreground classes, keyed by id or, as IRNet does for VOC, by the id as an integer
    (2007_000032 -> 2007000032)."""
    if not path.is_file():
        raise DataError(f"image label file {path} does not exist (config key data.image_labels)")
    try:
        # A pickled dict is the format IRNet publishes; load only label files you trust.
        table = np.load(path, allow_pickle=True).item()
        labels = {}
        for key, vector in table.items():
            vector = np.asarray(vector).ravel()
            if vector.size != num_classes - 1:
                raise DataError(f"{path}: labels of {key!r} have {vector.size} entries, "
                                f"expected {num_classes - 1} (one per foreground class)")
            labels[str(key)] = np.flatnonzero(vector > 0.5).astype(np.int64) + 1
        return labels
    except (ValueError, OSError, AttributeError, EOFError) as error:
        raise DataError(f"{path} is not a cls_labels.npy dict of multi-hot vectors ({type(error).__name__})") from None


def image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"{path} is not a readable image ({type(error).__name__})") from None


def open_dataset(data) -> VOCDataset:
    """The data set a DataConfig describes; one instance per process, so labels are read once."""
    return _open_dataset(data.root, data.train_masks, data.image_labels)


@functools.lru_cache(maxsize=8)
def _open_dataset(root: str, train_masks: str, image_labels: Optional[str]) -> VOCDataset:
    return VOCDataset(root, train_masks, image_labels)


def score_split(data) -> str:
    """The split whose CAMs and pseudo masks are scored against ground truth."""
    return data.score_split or data.train_split


def score_ids(data, dataset: VOCDataset) -> set[str]:
    return set(dataset.split_ids(score_split(data)))


def normalize(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float tensor with ImageNet statistics."""
    array = (image.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def multi_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Foreground class indices (1..C-1) -> a float vector of length C-1."""
    vector = torch.zeros(num_classes - 1)
    vector[torch.as_tensor(labels, dtype=torch.long) - 1] = 1.0
    return vector


class MaskFolder:
    """Pixel labels read from ``<folder>/<id>.png`` (picklable, for DataLoader workers)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, image_id: str) -> np.ndarray:
        return load_mask(self.folder / f"{image_id}.png")


class TrainingSet(torch.utils.data.Dataset):
    """Random rescale, horizontal flip, pad and crop of an image and its pixel labels.

    ``pixel_labels`` maps item keys to id -> uint8 mask functions (ground truth, pseudo
    masks, weak labels), e.g. ``{"mask": dataset.load_train_mask}``; every mask gets the
    image's augmentation. Without it only the image-level labels are returned (CAM training).
    """

    def __init__(self, dataset: VOCDataset, ids: list[str], crop_size: int, scale_range: list[float],
                 pixel_labels: Optional[dict[str, Callable[[str], np.ndarray]]] = None):
        self.dataset = dataset
        self.ids = ids
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.pixel_labels = pixel_labels or {}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = Image.fromarray(self.dataset.load_image(image_id))
        masks = {key: Image.fromarray(load(image_id)) for key, load in self.pixel_labels.items()}
        # torch's RNG, not NumPy's: DataLoader seeds it per worker from the loader's generator.
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand(()).item()
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR)
        masks = {key: mask.resize(size, Image.NEAREST) for key, mask in masks.items()}
        if torch.rand(()).item() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            masks = {key: mask.transpose(Image.FLIP_LEFT_RIGHT) for key, mask in masks.items()}
        image_t, masks_t = self._pad_and_crop(
            normalize(np.array(image)), {key: torch.from_numpy(np.array(mask, dtype=np.int64)) for key, mask in masks.items()})
        return {"image": image_t, "labels": multi_hot(self.dataset.image_labels(image_id), self.dataset.num_classes)} \
            | masks_t

    def _pad_and_crop(self, image: torch.Tensor, masks: dict[str, torch.Tensor]):
        crop = self.crop_size
        _, height, width = image.shape
        pad_h, pad_w = max(0, crop - height), max(0, crop - width)
        if pad_h or pad_w:
            # Padding is zero after normalisation (the mean colour) and 'ignore' in the masks.
            image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h))
            masks = {key: torch.nn.functional.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE)
                     for key, mask in masks.items()}
        _, height, width = image.shape
        top = int(torch.randint(0, height - crop + 1, ()).item())
        left = int(torch.randint(0, width - crop + 1, ()).item())
        return (image[:, top:top + crop, left:left + crop],
                {key: mask[top:top + crop, left:left + crop] for key, mask in masks.items()})


def prepare_data(cfg) -> VOCDataset:
    """Generates the demo data set when the config asks for it, then checks every listed id."""
    if cfg.demo is not None:
        ensure_demo_data(Path(cfg.data.root), cfg.demo)
    _fall_back_if_missing(cfg.data)
    dataset = open_dataset(cfg.data)
    data = cfg.data
    train_ids = dataset.split_ids(data.train_split)
    if data.score_split:
        outside = sorted(set(dataset.split_ids(data.score_split)) - set(train_ids))
        if outside:
            raise DataError(f"data.score_split {data.score_split!r} lists {len(outside)} ids outside "
                            f"data.train_split {data.train_split!r}, e.g. {outside[0]!r}")
    dataset.validate(data.train_split, [data.val_split] + ([data.score_split] if data.score_split else []))
    trainings = {"cam": cfg.cam.train, "seg": cfg.seg.train}
    if cfg.refine.method == "affinity":
        trainings["refine.affinity"] = cfg.refine.affinity.train
    for section, train in trainings.items():
        if len(train_ids) < train.batch_size:
            raise ConfigError(f"config key '{section}.train.batch_size' is {train.batch_size} "
                              f"but the train split has only {len(train_ids)} images")
    return dataset


def _fall_back_if_missing(data) -> None:
    """Switches to ``fallback_train_split`` with SegmentationClass when the configured train
    split's list or mask folder is missing (VOC without the SBD augmentation); says so on stderr.
    The switch happens before any cache key is computed, so the keys record what was used."""
    root = Path(data.root)
    missing = [str(p) for p in (root / "ImageSets" / "Segmentation" / f"{data.train_split}.txt", root / data.train_masks)
               if not p.exists()]
    if data.fallback_train_split is None or not missing or data.train_split == data.fallback_train_split:
        return
    print(f"note: {missing[0]} not found; training on split {data.fallback_train_split!r} with "
          "SegmentationClass (data.fallback_train_split)", file=sys.stderr)
    data.train_split, data.train_masks = data.fallback_train_split, "SegmentationClass"


def ensure_demo_data(root: Path, demo) -> None:
    """Writes the demo data set into ``root`` unless it is already there with these parameters.

    Generation goes into a sibling folder that is renamed into place when complete, so an
    interrupted generation is never mistaken for a data set.
    """
    params = dataclasses.asdict(demo)
    marker = root / "demo.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return
    if root.exists() and not marker.is_file():
        raise DataError(f"data.root {root} exists but is not a generated demo data set; "
                        "point data.root elsewhere or remove the demo: section")
    for leftover in root.parent.glob(f".{root.name}.partial-*"):  # from killed generations
        shutil.rmtree(leftover, ignore_errors=True)
    partial = root.with_name(f".{root.name}.partial-{os.getpid()}")
    generate_demo_dataset(partial, num_train=demo.num_train, num_val=demo.num_val,
                          min_size=demo.min_size, max_size=demo.max_size, seed=demo.seed)
    atomic_write_json(partial / "demo.json", params)
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, root)
    _open_dataset.cache_clear()
