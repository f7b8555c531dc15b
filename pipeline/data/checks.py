"""Per-file checks of images and masks (decoded completely, sizes, label values), remembered
in a file of file identities so a rerun skips unchanged files.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from pipeline.core.cache import read_json
from pipeline.core.errors import DataError
from pipeline.core.io import (
    atomic_write_json,
    file_identity,
    known_digests,
    load_mask,
    read_rgb,
    remember_digests,
)


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


def image_check(path: Path) -> list:
    """[width, height] of an image decoded completely (a truncated file fails here, not mid-training)."""
    try:
        height, width = read_rgb(path).shape[:2]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"image {path} cannot be decoded "
                        f"({' '.join(str(error).split()) or type(error).__name__})") from None
    return [width, height]


def mask_check(path: Path) -> list:
    """[width, height, *sorted values] of a mask file."""
    try:
        mask = load_mask(path)
    except ValueError as error:  # e.g. an RGB mask instead of class indices
        raise DataError(str(error)) from None
    except (OSError, SyntaxError) as error:
        raise DataError(f"mask {path} cannot be decoded ({' '.join(str(error).split())})") from None
    return [mask.shape[1], mask.shape[0]] + np.unique(mask).tolist()


def decoded_size(path: Path) -> tuple[int, int]:
    """(width, height) after the EXIF orientation, from the header alone."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            transposed = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except OSError as error:
        raise DataError(f"{path} is not a readable image ({type(error).__name__})") from None
    return (height, width) if transposed else (width, height)
