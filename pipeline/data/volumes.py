"""Grouping 2-D slices into 3-D volumes for per-volume scores (``data.volume_pattern``),
and each volume's spacing (``data.spacing``, ``data.spacing_file``).
"""
from __future__ import annotations

import copy
import csv
import io
import math
import re
from pathlib import Path

from pipeline.core.errors import DataError
from pipeline.data.dataset import VOCDataset
from pipeline.data.labels import read_text


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
        place = volume_and_order(self.pattern, image_id)
        if place is None:
            raise DataError(f"id {image_id!r} does not match data.volume_pattern {self.pattern.pattern!r}")
        return None if place[0] in self.excluded else place

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


def volume_and_order(pattern: re.Pattern, image_id: str) -> tuple[str, tuple] | None:
    """The volume ``pattern`` names in ``image_id`` (its first group, else the whole match) and
    the slice's order in it; None where the id does not match."""
    match = pattern.search(image_id)
    if match is None:
        return None
    return (match.group(1) if pattern.groups else match.group(0)), natural_order(image_id)


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
