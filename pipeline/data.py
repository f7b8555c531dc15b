"""Data sets in the PASCAL VOC folder layout, and the training-time augmentation.

Layout (the demo generator writes it, real data sets come in it)::

    <root>/JPEGImages/<id>.jpg|jpeg|png|bmp|tif|tiff   the image (any mode PIL reads, see io.to_rgb)
    <root>/classes.txt                    class names, line number = class index, 0 = background
    <root>/SegmentationClass/<id>.png     optional: uint8 class index per pixel, 255 = unlabelled
    <root>/ImageSets/Segmentation/<split>.txt   optional: one id per line
    <root>/<data.tags>                    optional: image-level labels by class name (pipeline/labels.py)

Image-level labels come from the tags file when there is one, else from IRNet's
cls_labels.npy (``data.image_labels``), else from the train masks (the classes present).
Masks are otherwise used for scores only: an id without one is trained on and left out
of the scores. Without split files the train split is every id of the tags file, and
there is no val split.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torchvision
from PIL import Image

from pipeline.cache import read_json
from pipeline.errors import ConfigError, DataError
from pipeline.demo_data import generate_demo_dataset
from pipeline.io import (atomic_write_json, file_digest, file_identity, known_digests, load_mask, read_rgb,
                         remember_digests)
from pipeline.labels import read_cls_labels, read_id_lines, read_tags, read_text
from pipeline.runtime import world_size

IGNORE = 255
BACKGROUND = 0  # class 0 of every data set (classes.txt names it first)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SPLITS = Path("ImageSets") / "Segmentation"
GROUND_TRUTH = "SegmentationClass"
# Images are normalised with the ImageNet statistics whatever the initialisation, so
# pretrained and random backbones see the same input range.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class FileChecks:
    """What validation found in each file (an image's decoded size; a mask's size and values),
    remembered by the file's identity (io.file_identity: size, modification and change times,
    inode) in ``<run-dir>/checked_files.json`` together with the files' content digests, so a
    rerun on VOC-size data decodes and hashes only what changed."""

    def __init__(self, path: Optional[Path] = None):
        self.path = path
        self.entries: dict[str, list] = {}
        self.hits = self.misses = 0
        self.seconds = 0.0
        saved = read_json(path) if path is not None else None
        if isinstance(saved, dict) and isinstance(saved.get("checks"), dict):
            try:
                remember_digests(saved.get("digests", []))
                self.entries = saved["checks"]
            except (TypeError, ValueError):  # another version's format: check everything again
                self.entries = {}

    def get(self, path: Path, compute: Callable[[Path], list]) -> list:
        identity = list(file_identity(path))
        key = os.path.abspath(path)
        entry = self.entries.get(key)
        if entry is not None and entry[0] == identity:
            self.hits += 1
            return entry[1]
        self.misses += 1
        result = compute(path)
        self.entries[key] = [identity, result]
        return result

    def summary(self) -> str:
        return (f"data: {self.hits + self.misses} files checked in {self.seconds:.1f} s "
                f"({self.hits} unchanged since the last check, not decoded again)")

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"checks": self.entries, "digests": known_digests()})


class VOCDataset:
    """Read access to one data folder; every path problem is a one-line DataError.

    ``train_masks`` is the folder of the train split's masks (VOC: SegmentationClassAug for
    train_aug); ground truth for scoring always comes from SegmentationClass. ``tags`` (a CSV
    or JSON file) or ``image_labels_file`` (IRNet's pickled cls_labels.npy, only with
    ``allow_pickle``) give the image-level labels instead of the masks.
    """

    def __init__(self, root: str | Path, train_split: str = "train", train_masks: str = GROUND_TRUTH,
                 tags: Optional[str] = None, image_labels_file: Optional[str] = None, allow_pickle: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist (config key data.root)")
        if not (self.root / "JPEGImages").is_dir():
            raise DataError(f"data folder {self.root} has no JPEGImages/ (expected the VOC layout, see README)")
        self.classes = read_classes(self.root)
        self.train_split = train_split
        self.train_masks = train_masks
        self.has_split_files = (self.root / SPLITS).is_dir()
        self.tags_file = tags
        self.labels_path = self.root / (tags or image_labels_file) if (tags or image_labels_file) else None
        if tags:
            self._file_labels = read_tags(self.labels_path, self.classes)
        elif image_labels_file:
            self._file_labels = read_cls_labels(self.labels_path, len(self.classes), allow_pickle)
        else:
            self._file_labels = None
        if not self.has_split_files and tags is None:
            raise DataError(f"data folder {self.root} has no {SPLITS}/ and no tags file (config key data.tags): "
                            "nothing lists the train images")
        self._labels: dict[str, np.ndarray] = {}
        self._sizes: dict[str, tuple[int, int]] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split_ids(self, split: str) -> list[str]:
        """The ids of a split; without split files, the tags file's ids for the train split
        and none for any other."""
        if not self.has_split_files:
            return list(self._file_labels) if split == self.train_split else []
        path = self.split_path(split)
        if not path.is_file():
            raise DataError(f"split file {path} does not exist (config keys data.train_split / data.val_split)")
        ids = read_id_lines(path)
        if not ids:
            raise DataError(f"split file {path} lists no ids")
        return ids

    def split_path(self, split: str) -> Path:
        return self.root / SPLITS / f"{split}.txt"

    def image_path(self, image_id: str) -> Path:
        folder = self.root / "JPEGImages"
        for suffix in IMAGE_SUFFIXES:
            for name in (image_id + suffix, image_id + suffix.upper()):
                if (folder / name).is_file():
                    return folder / name
        hint = ("; ids are file names without their extension" if Path(image_id).suffix.lower() in IMAGE_SUFFIXES
                else "")
        raise DataError(f"id {image_id!r} has no image {folder}/{image_id}.jpg|jpeg|png|bmp|tif|tiff{hint}")

    def mask_path(self, image_id: str, folder: str = GROUND_TRUTH) -> Path:
        path = self.root / folder / f"{image_id}.png"
        if not path.is_file():
            raise DataError(f"id {image_id!r} has no mask {path}")
        return path

    def has_mask(self, image_id: str, folder: str = GROUND_TRUTH) -> bool:
        return (self.root / folder / f"{image_id}.png").is_file()

    def with_masks(self, ids: list[str]) -> list[str]:
        """The ids that have ground truth, in order: the ones a stage scores."""
        return [image_id for image_id in ids if self.has_mask(image_id)]

    def load_image(self, image_id: str) -> np.ndarray:
        """HxWx3 uint8, upright (io.to_rgb: EXIF orientation, greyscale, palette, alpha, 16-bit)."""
        return read_rgb(self.image_path(image_id))

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(width, height) of the image as loaded (after its EXIF orientation)."""
        if image_id not in self._sizes:
            self._sizes[image_id] = _decoded_size(self.image_path(image_id))
        return self._sizes[image_id]

    def load_mask(self, image_id: str) -> np.ndarray:
        """Ground truth, for scoring."""
        return load_mask(self.mask_path(image_id))

    def load_train_mask(self, image_id: str) -> np.ndarray:
        """The training mask of a train-split id (full mode's pixel labels)."""
        return load_mask(self.mask_path(image_id, self.train_masks))

    def image_labels(self, image_id: str) -> np.ndarray:
        """Sorted foreground class indices (1..C-1) of a train-split id."""
        if self._file_labels is not None:
            # IRNet's cls_labels.npy keys VOC ids as integers (2007_000032 -> 2007000032).
            keys = (image_id,) if self.tags_file else (image_id, image_id.replace("_", ""))
            for key in keys:
                if key in self._file_labels:
                    return self._file_labels[key]
            raise DataError(f"{self.labels_path} has no labels for id {image_id!r}")
        if image_id not in self._labels:
            if not self.has_mask(image_id, self.train_masks):
                raise DataError(f"id {image_id!r} has no mask {self.root / self.train_masks}/{image_id}.png: weak mode "
                                "reads its image labels from it unless a tags file gives every train image's tags "
                                "(data.tags), and full and mixed modes train on it")
            self._labels[image_id] = _foreground(self.checked_values(self.mask_path(image_id, self.train_masks)))
        return self._labels[image_id]

    def checked_values(self, path: Path) -> np.ndarray:
        """The sorted values in a mask file, checked to be class indices of classes.txt or 255."""
        present = np.asarray(_mask_check(path)[2:], dtype=np.uint8)
        return self._checked(path, present)

    def _checked(self, path: Path, present: np.ndarray) -> np.ndarray:
        bad = present[(present >= self.num_classes) & (present != IGNORE)]
        if bad.size:
            raise DataError(f"mask {path} has class index {int(bad[0])}, "
                            f"but classes.txt names only {self.num_classes} classes")
        return present

    def validate(self, train_split: str, scored_splits: list[str], checks: Optional[FileChecks] = None) -> None:
        """Checks every listed id before any work: its image decodes completely, a train id has
        image labels (tags, label file or mask), and every mask that exists has its image's
        size and class indices only. ``checks`` remembers the results per unchanged file."""
        checks = checks or FileChecks()
        for split, folder in [(train_split, self.train_masks)] + [(s, GROUND_TRUTH) for s in scored_splits]:
            for image_id in self.split_ids(split):
                path = self.image_path(image_id)
                self._sizes[image_id] = tuple(checks.get(path, _image_check))
                if self.has_mask(image_id, folder):
                    mask = self.mask_path(image_id, folder)
                    width, height, *values = checks.get(mask, _mask_check)
                    if (width, height) != self._sizes[image_id]:
                        raise DataError(f"mask {mask} is {width}x{height} but its image "
                                        f"{path.name} is {self._sizes[image_id][0]}x{self._sizes[image_id][1]}")
                    present = self._checked(mask, np.asarray(values, dtype=np.uint8))
                    if split == train_split and self._file_labels is None:
                        self._labels[image_id] = _foreground(present)  # what image_labels would read
                if split == train_split:
                    self.image_labels(image_id)  # every train id needs labels

    def fingerprint(self, train_split: Optional[str] = None, scored_splits: list[str] = ()) -> str:
        """Identifies the data a stage reads: split lists and the contents of every image and
        of every mask that exists (training masks for the train split, ground truth for scored
        splits) and of the image-label file."""
        digest = hashlib.sha256(f"{self.classes}:{self.train_masks}".encode())
        if self.labels_path is not None:
            digest.update(f"labels:{file_digest(self.labels_path)}".encode())
        parts = ([(train_split, self.train_masks)] if train_split else []) + \
            [(split, GROUND_TRUTH) for split in scored_splits]
        for split, folder in parts:
            ids = self.split_ids(split)
            digest.update(f"{split}:{folder}:{','.join(ids)}".encode())
            for image_id in ids:
                image = self.image_path(image_id)
                mask = file_digest(self.mask_path(image_id, folder)) if self.has_mask(image_id, folder) else "-"
                digest.update(f"{image.name}:{file_digest(image)}:{mask}".encode())
        return digest.hexdigest()[:16]


def read_classes(root: Path) -> list[str]:
    """The class names of ``root/classes.txt``, one per line, background first."""
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise DataError(f"{classes_file} is missing: one class name per line, background first")
    classes = [line.strip() for line in read_text(classes_file, 'one class name per line').splitlines()
               if line.strip()]
    if len(classes) < 2:
        raise DataError(f"{classes_file} must name the background and at least one class")
    return classes


def _foreground(present: np.ndarray) -> np.ndarray:
    return present[(present != BACKGROUND) & (present != IGNORE)].astype(np.int64)


def _image_check(path: Path) -> list:
    """[width, height] of an image decoded completely (a truncated file fails here, not mid-training)."""
    try:
        height, width = read_rgb(path).shape[:2]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"image {path} cannot be decoded ({' '.join(str(error).split()) or type(error).__name__})") \
            from None
    return [width, height]


def _mask_check(path: Path) -> list:
    """[width, height, *sorted values] of a mask file."""
    try:
        mask = load_mask(path)
    except ValueError as error:  # e.g. an RGB mask instead of class indices
        raise DataError(str(error)) from None
    except (OSError, SyntaxError) as error:
        raise DataError(f"mask {path} cannot be decoded ({' '.join(str(error).split())})") from None
    return [mask.shape[1], mask.shape[0]] + np.unique(mask).tolist()


def _decoded_size(path: Path) -> tuple[int, int]:
    """(width, height) after the EXIF orientation, from the header alone."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            transposed = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except OSError as error:
        raise DataError(f"{path} is not a readable image ({type(error).__name__})") from None
    return (height, width) if transposed else (width, height)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of a mask or scribble file from its header (images: VOCDataset.image_size)."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"{path} is not a readable image ({type(error).__name__})") from None


def open_dataset(data) -> VOCDataset:
    """The data set a DataConfig describes; one instance per process, so labels are read once."""
    return _open_dataset(data.root, data.train_split, data.train_masks, data.tags, data.image_labels,
                         data.allow_pickle)


@functools.lru_cache(maxsize=8)
def _open_dataset(root: str, train_split: str, train_masks: str, tags: Optional[str], image_labels: Optional[str],
                  allow_pickle: bool) -> VOCDataset:
    return VOCDataset(root, train_split, train_masks, tags, image_labels, allow_pickle)


def score_split(data) -> str:
    """The split whose CAMs and pseudo masks are scored against ground truth."""
    return data.score_split or data.train_split


def score_ids(data, dataset: VOCDataset) -> set[str]:
    """The ids whose CAMs and pseudo masks are scored: those of the score split with ground truth."""
    return set(dataset.with_masks(dataset.split_ids(score_split(data))))


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
                 pixel_labels: Optional[dict[str, Callable[[str], np.ndarray]]] = None,
                 color_jitter: Optional[list[float]] = None):
        self.dataset = dataset
        self.ids = ids
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.pixel_labels = pixel_labels or {}
        # The image only; no draw at all without it, so runs without jitter keep their augmentations.
        self.jitter = torchvision.transforms.ColorJitter(*color_jitter) if color_jitter else None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = Image.fromarray(self.dataset.load_image(image_id))
        if self.jitter is not None:
            image = self.jitter(image)
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


def prepare_data(cfg, checks: Optional[FileChecks] = None) -> VOCDataset:
    """Generates the demo data set when the config asks for it, then checks every listed id
    (``checks`` remembers what was checked, so a rerun skips unchanged files, and times it)."""
    if cfg.demo is not None:
        ensure_demo_data(Path(cfg.data.root), cfg.demo)
    _fall_back_if_missing(cfg.data)
    _open_dataset.cache_clear()  # the folder as it is now, not as an earlier run in this process saw it
    dataset = open_dataset(cfg.data)
    data = cfg.data
    train_ids = dataset.split_ids(data.train_split)
    if data.score_split:
        if not dataset.has_split_files:
            raise DataError(f"data.score_split is {data.score_split!r} but {dataset.root} has no {SPLITS}/")
        outside = sorted(set(dataset.split_ids(data.score_split)) - set(train_ids))
        if outside:
            raise DataError(f"data.score_split {data.score_split!r} lists {len(outside)} ids outside "
                            f"data.train_split {data.train_split!r}, e.g. {outside[0]!r}")
    checks = checks or FileChecks()
    started = time.perf_counter()
    dataset.validate(data.train_split, [data.val_split] + ([data.score_split] if data.score_split else []), checks)
    checks.seconds += time.perf_counter() - started
    if data.volume_pattern is not None:
        Volumes(data, dataset.root).check(dataset.split_ids(data.val_split), dataset)
    trainings = {"cam": cfg.cam.train, "seg": cfg.seg.train}
    if cfg.refine.method != "crf":
        trainings[f"refine.{cfg.refine.method}"] = getattr(cfg.refine, cfg.refine.method).train
    processes = world_size()
    for section, train in trainings.items():
        if len(train_ids) < train.batch_size:
            raise ConfigError(f"config key '{section}.train.batch_size' is {train.batch_size} "
                              f"but the train split has only {len(train_ids)} images")
        if train.amp == "fp16" and (cfg.device == "cpu" or not torch.cuda.is_available()):
            raise ConfigError(f"config key '{section}.train.amp' is fp16, which needs a CUDA device; "
                              "use bf16 or off on the CPU")
        if train.batch_size % processes or train.batch_size // processes < 2:
            raise ConfigError(f"config key '{section}.train.batch_size' is {train.batch_size}: under torchrun it "
                              f"is shared by {processes} processes, and each needs an equal share of at least 2")
    return dataset


class Volumes:
    """Which 3-D volume each 2-D slice id belongs to (``data.volume_pattern``), the slices'
    order in it (the natural order of the ids: slice_2 before slice_10), and each volume's
    spacing (``data.spacing`` or ``data.spacing_file``; empty: pixels)."""

    def __init__(self, data, root: Path):
        self.pattern = re.compile(data.volume_pattern)
        self.spacing_file = root / data.spacing_file if data.spacing_file else None
        self.fixed_spacing = tuple(data.spacing) if data.spacing else None
        self.file_spacing = _read_spacing(self.spacing_file) if self.spacing_file else {}
        self.excluded: set[str] = set()  # volumes left out of the scores (see complete)

    def __call__(self, image_id: str) -> tuple[str, tuple] | None:
        match = self.pattern.search(image_id)
        if match is None:
            raise DataError(f"id {image_id!r} does not match data.volume_pattern {self.pattern.pattern!r}")
        volume = match.group(1) if self.pattern.groups else match.group(0)
        return None if volume in self.excluded else (volume, natural_order(image_id))

    def spacing(self, ids: list[str]) -> dict:
        """Volume -> (slice, row, column) spacing for the volumes of ``ids``."""
        volumes = {self(image_id)[0] for image_id in ids if self(image_id) is not None}
        if self.fixed_spacing:
            return {volume: self.fixed_spacing for volume in volumes}
        missing = sorted(volumes - set(self.file_spacing))
        if self.spacing_file and missing:
            raise DataError(f"{self.spacing_file} has no spacing for volume {missing[0]!r}")
        return {volume: self.file_spacing[volume] for volume in volumes if volume in self.file_spacing}

    def complete(self, ids: list[str], dataset: VOCDataset) -> "Volumes":
        """This grouping restricted to the volumes every slice of which (among ``ids``) has a
        mask: stacking only the slices that have one would make non-adjacent slices neighbours.
        A slice of another volume maps to None (scored per slice only)."""
        missing = {self(image_id)[0] for image_id in ids if not dataset.has_mask(image_id)}
        restricted = copy.copy(self)
        restricted.excluded = missing
        return restricted

    def check(self, ids: list[str], dataset: VOCDataset) -> None:
        """Every id matches the pattern, the slices of a volume share one size, and each volume has
        a spacing when a spacing file is given."""
        sizes = {}
        for image_id in ids:
            volume = self(image_id)[0]
            size = dataset.image_size(image_id)
            first = sizes.setdefault(volume, (image_id, size))
            if first[1] != size:
                raise DataError(f"slices {first[0]!r} ({first[1][0]}x{first[1][1]}) and {image_id!r} "
                                f"({size[0]}x{size[1]}) of volume {volume!r} differ in size")
        self.spacing(ids)


def natural_order(text: str) -> tuple:
    """A sort key in which digit runs compare as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def _read_spacing(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"spacing file {path} does not exist (config key data.spacing_file)")
    reader = csv.reader(io.StringIO(read_text(path, "a spacing CSV")))
    header = [h.strip().lower() for h in next(reader, [])]
    if header != ["volume", "slice", "row", "column"]:
        raise DataError(f"{path} line 1: the header must be 'volume,slice,row,column'")
    spacing = {}
    for row in reader:
        if not row:
            continue
        try:
            values = tuple(float(v) for v in row[1:])
        except ValueError:
            values = ()
        if len(row) != 4 or len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
            raise DataError(f"{path} line {reader.line_num}: expected a volume name and 3 positive spacings")
        spacing[row[0].strip()] = values
    return spacing


def _fall_back_if_missing(data) -> None:
    """Switches to ``fallback_train_split`` with SegmentationClass when the configured train
    split's list or mask folder is missing (VOC without the SBD augmentation); says so on stderr.
    The switch happens before any cache key is computed, so the keys record what was used."""
    root = Path(data.root)
    # With tags the train masks are for scores only: whether they exist must not change the training set.
    needed = [root / SPLITS / f"{data.train_split}.txt"] + ([] if data.tags or data.image_labels else
                                                             [root / data.train_masks])
    missing = [str(p) for p in needed if not p.exists()]
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
