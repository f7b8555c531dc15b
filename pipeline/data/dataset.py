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

import functools
import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from pipeline.core.errors import DataError
from pipeline.core.io import file_digest, load_mask, read_rgb
from pipeline.data.checks import FileChecks, decoded_size, image_check, mask_check
from pipeline.data.labels import read_cls_labels, read_id_lines, read_tags, read_text

IGNORE = 255


BACKGROUND = 0  # class 0 of every data set (classes.txt names it first)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


SPLITS = Path("ImageSets") / "Segmentation"


GROUND_TRUTH = "SegmentationClass"


class VOCDataset:
    """Read access to one data folder; every path problem is a one-line DataError.

    ``train_masks`` is the folder of the train split's masks (VOC: SegmentationClassAug for
    train_aug); ground truth for scoring always comes from SegmentationClass. ``tags`` (a CSV
    or JSON file) or ``image_labels_file`` (IRNet's pickled cls_labels.npy, only with
    ``allow_pickle``) give the image-level labels instead of the masks.
    """

    def __init__(self, root: str | Path, train_split: str = "train", train_masks: str = GROUND_TRUTH,
                 tags: Optional[str] = None, image_labels_file: Optional[str] = None,
                 allow_pickle: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist (config key data.root)")
        if not (self.root / "JPEGImages").is_dir():
            raise DataError(f"data folder {self.root} has no JPEGImages/ "
                            "(expected the VOC layout, see README)")
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
            raise DataError(f"data folder {self.root} has no {SPLITS}/ and no tags file "
                            "(config key data.tags): nothing lists the train images")
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
            raise DataError(f"split file {path} does not exist "
                            "(config keys data.train_split / data.val_split)")
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
        hint = ("; ids are file names without their extension"
                if Path(image_id).suffix.lower() in IMAGE_SUFFIXES else "")
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
            self._sizes[image_id] = decoded_size(self.image_path(image_id))
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
                raise DataError(f"id {image_id!r} has no mask {self.root / self.train_masks}/{image_id}.png: "
                                "weak mode reads its image labels from it unless a tags file gives every "
                                "train image's tags (data.tags), and full and mixed modes train on it")
            mask = self.mask_path(image_id, self.train_masks)
            self._labels[image_id] = foreground_classes(self.checked_values(mask))
        return self._labels[image_id]

    def checked_values(self, path: Path) -> np.ndarray:
        """The sorted values in a mask file, checked to be class indices of classes.txt or 255."""
        present = np.asarray(mask_check(path)[2:], dtype=np.uint8)
        return self._checked(path, present)

    def _checked(self, path: Path, present: np.ndarray) -> np.ndarray:
        bad = present[(present >= self.num_classes) & (present != IGNORE)]
        if bad.size:
            raise DataError(f"mask {path} has class index {int(bad[0])}, "
                            f"but classes.txt names only {self.num_classes} classes")
        return present

    def validate(self, train_split: str, scored_splits: list[str],
                 checks: Optional[FileChecks] = None) -> None:
        """Checks every listed id before any work: its image decodes completely, a train id has
        image labels (tags, label file or mask), and every mask that exists has its image's
        size and class indices only. ``checks`` remembers the results per unchanged file."""
        checks = checks or FileChecks()
        for split, folder in [(train_split, self.train_masks)] + [(s, GROUND_TRUTH) for s in scored_splits]:
            for image_id in self.split_ids(split):
                path = self.image_path(image_id)
                self._sizes[image_id] = tuple(checks.get(path, image_check))
                if self.has_mask(image_id, folder):
                    mask = self.mask_path(image_id, folder)
                    width, height, *values = checks.get(mask, mask_check)
                    if (width, height) != self._sizes[image_id]:
                        image_width, image_height = self._sizes[image_id]
                        raise DataError(f"mask {mask} is {width}x{height} but its image "
                                        f"{path.name} is {image_width}x{image_height}")
                    present = self._checked(mask, np.asarray(values, dtype=np.uint8))
                    if split == train_split and self._file_labels is None:
                        self._labels[image_id] = foreground_classes(present)  # what image_labels would read
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
                has_mask = self.has_mask(image_id, folder)
                mask = file_digest(self.mask_path(image_id, folder)) if has_mask else "-"
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


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of a mask or scribble file from its header (images: VOCDataset.image_size)."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"{path} is not a readable image ({type(error).__name__})") from None


def foreground_classes(present: np.ndarray) -> np.ndarray:
    return present[(present != BACKGROUND) & (present != IGNORE)].astype(np.int64)


def open_dataset(data) -> VOCDataset:
    """The data set a DataConfig describes; one instance per process, so labels are read once."""
    return _open_dataset(data.root, data.train_split, data.train_masks, data.tags, data.image_labels,
                         data.allow_pickle)


@functools.lru_cache(maxsize=8)
def _open_dataset(root: str, train_split: str, train_masks: str, tags: Optional[str],
                  image_labels: Optional[str], allow_pickle: bool) -> VOCDataset:
    return VOCDataset(root, train_split, train_masks, tags, image_labels, allow_pickle)


def score_split(data) -> str:
    """The split whose CAMs and pseudo masks are scored against ground truth."""
    return data.score_split or data.train_split


def score_ids(data, dataset: VOCDataset) -> set[str]:
    """The ids whose CAMs and pseudo masks are scored: those of the score split with ground truth."""
    return set(dataset.with_masks(dataset.split_ids(score_split(data))))


def forget_opened_datasets() -> None:
    """The next :func:`open_dataset` reads the folder as it is now, not as this process saw it
    earlier (the data sets it opened are kept, so labels and sizes are read once)."""
    _open_dataset.cache_clear()
