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
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from pipeline.errors import ConfigError, DataError
from pipeline.demo_data import generate_demo_dataset
from pipeline.io import atomic_write_json, load_mask

IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Images are normalised with the ImageNet statistics whatever the initialisation, so
# pretrained and random backbones see the same input range.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class VOCDataset:
    """Read access to one data folder; every path problem is a one-line DataError."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist (config key data.root)")
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            if not (self.root / sub).is_dir():
                raise DataError(f"data folder {self.root} has no {sub}/ (expected the VOC layout, see README)")
        classes_file = self.root / "classes.txt"
        if not classes_file.is_file():
            raise DataError(f"{classes_file} is missing: one class name per line, background first")
        self.classes = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
        if len(self.classes) < 2:
            raise DataError(f"{classes_file} must name the background and at least one class")
        self._labels: dict[str, np.ndarray] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split_ids(self, split: str) -> list[str]:
        path = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not path.is_file():
            raise DataError(f"split file {path} does not exist (config keys data.train_split / data.val_split)")
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(f"split file {path} lists no ids")
        return ids

    def image_path(self, image_id: str) -> Path:
        for suffix in IMAGE_SUFFIXES:
            path = self.root / "JPEGImages" / f"{image_id}{suffix}"
            if path.is_file():
                return path
        raise DataError(f"id {image_id!r} has no image JPEGImages/{image_id}.jpg|png in {self.root}")

    def mask_path(self, image_id: str) -> Path:
        path = self.root / "SegmentationClass" / f"{image_id}.png"
        if not path.is_file():
            raise DataError(f"id {image_id!r} has no mask {path}")
        return path

    def load_image(self, image_id: str) -> np.ndarray:
        """HxWx3 uint8; grayscale images are replicated to three channels."""
        with Image.open(self.image_path(image_id)) as image:
            return np.array(image.convert("RGB"))

    def load_mask(self, image_id: str) -> np.ndarray:
        return load_mask(self.mask_path(image_id))

    def image_labels(self, image_id: str) -> np.ndarray:
        """Sorted foreground class indices (1..C-1) present in the image's mask."""
        if image_id not in self._labels:
            mask = self.load_mask(image_id)
            present = np.unique(mask)
            bad = present[(present >= self.num_classes) & (present != IGNORE)]
            if bad.size:
                raise DataError(f"mask {self.mask_path(image_id)} has class index {int(bad[0])}, "
                                f"but classes.txt names only {self.num_classes} classes")
            self._labels[image_id] = present[(present > 0) & (present != IGNORE)].astype(np.int64)
        return self._labels[image_id]

    def validate(self, splits: list[str]) -> None:
        """Checks every listed id: image present, mask present, same size, valid indices."""
        for split in splits:
            for image_id in self.split_ids(split):
                image_size = _image_size(self.image_path(image_id))
                mask_size = _image_size(self.mask_path(image_id))
                if image_size != mask_size:
                    raise DataError(f"mask {self.mask_path(image_id)} is {mask_size[0]}x{mask_size[1]} "
                                    f"but its image is {image_size[0]}x{image_size[1]}")
                try:
                    self.image_labels(image_id)
                except ValueError as error:  # e.g. an RGB mask instead of class indices
                    raise DataError(str(error)) from None

    def fingerprint(self, splits: list[str]) -> str:
        """Identifies the data a stage reads: split lists plus size and mtime of every file."""
        digest = hashlib.sha256(str(self.classes).encode())
        for split in splits:
            ids = self.split_ids(split)
            digest.update(f"{split}:{','.join(ids)}".encode())
            for image_id in ids:
                for path in (self.image_path(image_id), self.mask_path(image_id)):
                    stat = path.stat()
                    digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"{path} is not a readable image ({type(error).__name__})") from None


@functools.lru_cache(maxsize=8)
def open_dataset(root: str) -> VOCDataset:
    """One VOCDataset per folder per process, so image labels are read once."""
    return VOCDataset(root)


def normalize(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float tensor with ImageNet statistics."""
    array = (image.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def multi_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Foreground class indices (1..C-1) -> a float vector of length C-1."""
    vector = torch.zeros(num_classes - 1)
    vector[torch.as_tensor(labels, dtype=torch.long) - 1] = 1.0
    return vector


class TrainingSet(torch.utils.data.Dataset):
    """Random rescale, horizontal flip, pad and crop of an image (and its pixel labels).

    ``pixel_labels`` maps an id to its uint8 mask (ground truth or pseudo mask); without
    it only the image-level labels are returned (CAM training).
    """

    def __init__(self, dataset: VOCDataset, ids: list[str], crop_size: int, scale_range: list[float],
                 pixel_labels: Optional[Callable[[str], np.ndarray]] = None):
        self.dataset = dataset
        self.ids = ids
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.pixel_labels = pixel_labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = Image.fromarray(self.dataset.load_image(image_id))
        mask = Image.fromarray(self.pixel_labels(image_id)) if self.pixel_labels else None
        # torch's RNG, not NumPy's: DataLoader seeds it per worker from the loader's generator.
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand(()).item()
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR)
        mask = mask.resize(size, Image.NEAREST) if mask is not None else None
        if torch.rand(()).item() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            mask = mask.transpose(Image.FLIP_LEFT_RIGHT) if mask is not None else None
        image_t = normalize(np.array(image))
        mask_t = torch.from_numpy(np.array(mask, dtype=np.int64)) if mask is not None else None
        image_t, mask_t = self._pad_and_crop(image_t, mask_t)
        item = {"image": image_t, "labels": multi_hot(self.dataset.image_labels(image_id), self.dataset.num_classes)}
        if mask_t is not None:
            item["mask"] = mask_t
        return item

    def _pad_and_crop(self, image: torch.Tensor, mask: Optional[torch.Tensor]):
        crop = self.crop_size
        _, height, width = image.shape
        pad_h, pad_w = max(0, crop - height), max(0, crop - width)
        if pad_h or pad_w:
            # Padding is zero after normalisation (the mean colour) and 'ignore' in the mask.
            image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h))
            if mask is not None:
                mask = torch.nn.functional.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE)
        _, height, width = image.shape
        top = int(torch.randint(0, height - crop + 1, ()).item())
        left = int(torch.randint(0, width - crop + 1, ()).item())
        image = image[:, top:top + crop, left:left + crop]
        if mask is not None:
            mask = mask[top:top + crop, left:left + crop]
        return image, mask


def prepare_data(cfg) -> VOCDataset:
    """Generates the demo data set when the config asks for it, then checks every listed id."""
    if cfg.demo is not None:
        ensure_demo_data(Path(cfg.data.root), cfg.demo)
    dataset = open_dataset(cfg.data.root)
    dataset.validate([cfg.data.train_split, cfg.data.val_split])
    num_train = len(dataset.split_ids(cfg.data.train_split))
    for section in ("cam", "seg"):
        if num_train < getattr(cfg, section).train.batch_size:
            raise ConfigError(f"config key '{section}.train.batch_size' is {getattr(cfg, section).train.batch_size} "
                              f"but the train split has only {num_train} images")
    return dataset


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
    open_dataset.cache_clear()
