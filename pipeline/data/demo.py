"""Synthetic demo data set in the PASCAL VOC layout.

The data set is small and fast to generate, but built to be hard in the ways
the Self-Regulation paper (Zhang et al., ICCV 2021) is about, so that networks
that use shallow details and deep context can be told apart from ones that
do not:

* Small objects and thin parts, which a coarse (stride 16-32) deep feature map
  misses and which need shallow, high-resolution features:

  - ``ball``:  a small shaded disk (radius about 3-7 px at 96-128 px).
  - ``lamp``:  a 1-3 px wide pole with a small shade on top and a flat foot.
  - ``table``: a wood-grain top on 2-3 legs that are 1-3 px wide; the legs
    belong to the class.

* Pairs of classes with the same local texture and colour distribution that
  differ only in global shape or part layout, so local evidence alone
  mislabels parts of large objects and deep context is needed:

  - ``bus`` vs ``house``: the same brick/stripe texture on a large rectangle;
    a bus has two small dark wheels under it, a house a triangular roof (in
    the same texture) on top.
  - ``plate`` vs ``tile``: the same checker/dot texture; a plate is a disk,
    a tile a (rotated) square.

  These objects are sometimes large (up to about 70% of the image side).

* Textured, cluttered backgrounds: two or three regions split by a (wavy)
  horizon or diagonal boundary, with gradients and noise, and small clutter
  (lines, blobs, rectangles) that is background in the mask. Clutter colours
  are partly drawn from the object colour distributions, so colour alone is
  not enough; objects are kept in contrast with what lies under them, so a
  CRF has edges to use.

Every image has 1-3 objects of distinct classes (about 8% have none), so each
foreground class appears in about a quarter of the images. Every image is
drawn from its own generator seeded by (seed, split, index): the same
arguments give byte-identical files, and the train images do not depend on the
number of val images (or vice versa).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from pipeline.core.errors import DataError
from pipeline.core.io import atomic_write_bytes, atomic_write_json, save_mask
from pipeline.data.demo_drawing import (
    add_clutter,
    background,
    convex_polygon,
    disk,
    grid,
    hsv,
    luminance,
    rotated_rectangle,
    shaded,
    texture_bus_house,
    texture_plate_tile,
    vivid_colour,
    wood,
    wood_colour,
)

DEMO_CLASSES: list[str] = ["background", "bus", "house", "plate", "tile", "table", "lamp", "ball"]
_SPLIT_CODES = {"train": 0, "val": 1}
_NO_OBJECT_PROBABILITY = 0.08
_MAX_OBJECTS = 3


# Minimum distance (RGB) between an object part's mean colour and the mean of
# what it is painted over; below it the part is lightened or darkened.
_MIN_CONTRAST = 60.0
_JPEG_QUALITY = 95


class _Shape(NamedTuple):
    parts: list[np.ndarray]
    rgb: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return np.logical_or.reduce(self.parts)


def _bus(rng: np.random.Generator, img_h: int, img_w: int) -> _Shape:
    body_w = int(rng.uniform(0.3, 0.7) * img_w)
    body_h = int(min(body_w / rng.uniform(1.5, 2.3), 0.55 * img_h))
    wheel_r = max(2.0, rng.uniform(0.13, 0.2) * body_h)
    h, w = body_h + int(np.ceil(wheel_r)), body_w
    # Wheel centres sit on the bottom edge of the body: half under it, half over it.
    wheels = (disk(h, w, body_h, rng.uniform(0.14, 0.26) * w, wheel_r)
              | disk(h, w, body_h, rng.uniform(0.74, 0.86) * w, wheel_r))
    body = np.zeros((h, w), dtype=bool)
    body[:body_h] = True
    body &= ~wheels
    tyre = hsv(rng, (0.0, 1.0), (0.0, 0.2), (0.05, 0.2))
    rgb = np.where(wheels[..., None], tyre, shaded(rng, texture_bus_house(rng, h, w), 0.15))
    return _Shape([body, wheels], rgb)


def _house(rng: np.random.Generator, img_h: int, img_w: int) -> _Shape:
    total_h = rng.uniform(0.3, 0.7) * img_h
    roof_h = int(rng.uniform(0.3, 0.45) * total_h)
    body_h = int(total_h) - roof_h
    body_w = int(min(body_h * rng.uniform(0.9, 1.6), 0.6 * img_w))
    overhang = int(rng.uniform(0.0, 0.12) * body_w)
    h, w = roof_h + body_h, body_w + 2 * overhang
    roof = convex_polygon(h, w, [(roof_h + 0.5, 0.0), (0.0, w / 2), (roof_h + 0.5, float(w))])
    body = np.zeros((h, w), dtype=bool)
    body[roof_h:, overhang:overhang + body_w] = True
    # One texture over the whole canvas: the roof continues the wall's texture.
    rgb = shaded(rng, texture_bus_house(rng, h, w), 0.15)
    return _Shape([roof | body], rgb)


def _plate(rng: np.random.Generator, img_h: int, img_w: int) -> _Shape:
    radius = rng.uniform(0.15, 0.34) * min(img_h, img_w)
    size = int(np.ceil(2 * radius))
    mask = disk(size, size, size / 2, size / 2, radius)
    return _Shape([mask], shaded(rng, texture_plate_tile(rng, size, size), 0.15))


def _tile(rng: np.random.Generator, img_h: int, img_w: int) -> _Shape:
    side = rng.uniform(0.25, 0.55) * min(img_h, img_w)
    angle = rng.uniform(0.0, np.pi / 2)
    size = int(np.ceil(side * (abs(np.cos(angle)) + abs(np.sin(angle)))))
    mask = rotated_rectangle(size, size, size / 2, size / 2, side / 2, side / 2, angle)
    return _Shape([mask], shaded(rng, texture_plate_tile(rng, size, size), 0.15))


def _table(rng: np.random.Generator, img_h: int, img_w: int) -> _Shape:
    leg_w = int(rng.integers(1, 4))  # the thin part: 1-3 px
    inset = int(rng.integers(0, 3))
    w = max(int(rng.uniform(0.3, 0.55) * img_w), 2 * (leg_w + inset) + 2)
    top_h = max(3, int(rng.uniform(0.05, 0.1) * img_h))
    leg_len = max(6, int(rng.uniform(0.2, 0.35) * img_h))
    h = top_h + leg_len
    top = np.zeros((h, w), dtype=bool)
    top[:top_h] = True
    legs = np.zeros((h, w), dtype=bool)
    for x0 in (inset, w - inset - leg_w):
        legs[top_h:, x0:x0 + leg_w] = True
    if rng.random() < 0.5:
        # A back leg, seen between the front ones and ending higher up.
        x0 = int(rng.uniform(0.3, 0.7) * w)
        legs[top_h:h - max(2, leg_len // 5), x0:x0 + leg_w] = True
    colour = wood_colour(rng)
    rgb = np.where(legs[..., None], colour * rng.uniform(0.5, 0.8), wood(rng, h, w, colour))
    return _Shape([top, legs], shaded(rng, rgb, 0.1))


def _lamp(rng: np.random.Generator, img_h: int, img_w: int) -> _Shape:
    side = min(img_h, img_w)
    shade_w = max(5, int(rng.uniform(0.12, 0.22) * side))
    shade_h = max(3, int(rng.uniform(0.08, 0.14) * side))
    pole_len = max(8, int(rng.uniform(0.3, 0.5) * img_h))
    pole_w = int(rng.integers(1, 4))  # the thin part: 1-3 px
    foot_h = int(rng.integers(1, 3))
    w, h = shade_w, shade_h + pole_len + foot_h
    narrowing = rng.uniform(0.15, 0.3) * shade_w
    shade = convex_polygon(h, w, [(0.0, narrowing), (0.0, w - narrowing),
                                   (float(shade_h), float(w)), (float(shade_h), 0.0)])
    stand = np.zeros((h, w), dtype=bool)
    x0 = (w - pole_w) // 2
    stand[shade_h:h - foot_h, x0:x0 + pole_w] = True
    foot_w = max(pole_w + 2, int(rng.uniform(0.5, 0.9) * w))
    stand[h - foot_h:, (w - foot_w) // 2:(w + foot_w) // 2] = True
    metal = hsv(rng, (0.0, 1.0), (0.0, 0.2), (0.1, 0.9))
    fabric = hsv(rng, (0.0, 1.0), (0.2, 0.7), (0.75, 1.0))
    rgb = np.where(shade[..., None], shaded(rng, np.broadcast_to(fabric, (h, w, 3)), 0.2), metal)
    return _Shape([shade, stand], rgb)


def _ball(rng: np.random.Generator, img_h: int, img_w: int) -> _Shape:
    radius = max(2.0, rng.uniform(0.03, 0.055) * min(img_h, img_w))
    size = int(np.ceil(2 * radius))
    mask = disk(size, size, size / 2, size / 2, radius)
    # Lit from the upper left: bright near a highlight point, darker towards the rim.
    yy, xx = grid(size, size)
    dist = np.hypot(yy - 0.35 * size, xx - 0.35 * size) / radius
    gain = np.clip(1.25 - 0.5 * dist, 0.5, 1.25)
    rgb = vivid_colour(rng) * gain[..., None]
    return _Shape([mask], rgb)


_OBJECT_DRAWERS: dict[str, Callable[[np.random.Generator, int, int], _Shape]] = {
    "bus": _bus, "house": _house, "plate": _plate, "tile": _tile,
    "table": _table, "lamp": _lamp, "ball": _ball,
}


assert list(_OBJECT_DRAWERS) == DEMO_CLASSES[1:]


def _place(rng: np.random.Generator, mask: np.ndarray, occupied: np.ndarray,
           tries: int = 20) -> tuple[int, int]:
    """Top-left corner for `mask` inside the image, preferring little overlap.

    Objects may overlap, but heavy overlap would hide the parts (wheels,
    roofs) that tell the confusable classes apart, so a few positions are
    tried and the least-overlapping one is kept.
    """
    img_h, img_w = occupied.shape
    h, w = mask.shape
    area = max(int(mask.sum()), 1)
    best, best_overlap = (0, 0), np.inf
    for _ in range(tries):
        top, left = int(rng.integers(0, img_h - h + 1)), int(rng.integers(0, img_w - w + 1))
        overlap = (occupied[top:top + h, left:left + w] & mask).sum() / area
        if overlap < best_overlap:
            best, best_overlap = (top, left), overlap
        if overlap <= 0.2:
            break
    return best


def _with_contrast(shape: _Shape, under: np.ndarray) -> np.ndarray:
    """Object colours, each part lightened or darkened if too close to what lies under it."""
    rgb = shape.rgb.copy()
    for part in shape.parts:
        if not part.any():
            continue
        under_mean = under[part].mean(axis=0)
        if np.linalg.norm(rgb[part].mean(axis=0) - under_mean) < _MIN_CONTRAST:
            direction = 1.0 if luminance(under_mean) < 128 else -1.0
            rgb[part] += direction * _MIN_CONTRAST
    return rgb


def _render(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 image, uint8 label map) pair."""
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    rgb = background(rng, h, w)
    add_clutter(rng, rgb)
    label = np.zeros((h, w), dtype=np.uint8)

    n_objects = 0 if rng.random() < _NO_OBJECT_PROBABILITY else int(rng.integers(1, _MAX_OBJECTS + 1))
    classes = rng.choice(np.arange(1, len(DEMO_CLASSES)), size=n_objects, replace=False)
    occupied = np.zeros((h, w), dtype=bool)
    placed = []
    for cls in classes:
        shape = _OBJECT_DRAWERS[DEMO_CLASSES[cls]](rng, h, w)
        top, left = _place(rng, shape.mask, occupied)
        occupied[top:top + shape.rgb.shape[0], left:left + shape.rgb.shape[1]] |= shape.mask
        placed.append((int(cls), shape, top, left))

    # Paint large objects first so small and thin ones are never hidden entirely.
    for cls, shape, top, left in sorted(placed, key=lambda p: -int(p[1].mask.sum())):
        window = (slice(top, top + shape.rgb.shape[0]), slice(left, left + shape.rgb.shape[1]))
        mask = shape.mask
        rgb[window][mask] = _with_contrast(shape, rgb[window])[mask]
        label[window][mask] = cls

    rgb += rng.normal(0.0, rng.uniform(2.0, 5.0), size=rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), label


def _write_pair(root: pathlib.Path, image_id: str, rgb: np.ndarray, label: np.ndarray) -> None:
    buffer = io.BytesIO()
    # 4:4:4 chroma: the default 4:2:0 subsampling would smear the colour of 1 px parts.
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    atomic_write_bytes(root / "JPEGImages" / f"{image_id}.jpg", buffer.getvalue())
    save_mask(root / "SegmentationClass" / f"{image_id}.png", label.astype(np.uint8))


def _write_text(path: pathlib.Path, lines: list[str]) -> None:
    atomic_write_bytes(path, "".join(f"{line}\n" for line in lines).encode("utf-8"))


def _validate(num_train: int, num_val: int, min_size: int, max_size: int, seed: int) -> None:
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    if num_val < 1:
        raise ValueError(f"num_val must be >= 1, got {num_val}")
    if min_size < 16:
        raise ValueError(f"min_size must be >= 16, got {min_size}")
    if max_size < min_size:
        raise ValueError(f"max_size must be >= min_size, got min_size={min_size}, max_size={max_size}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")


def generate_demo_dataset(root: pathlib.Path, num_train: int, num_val: int,
                          min_size: int, max_size: int, seed: int) -> None:
    """Writes a synthetic data set in the PASCAL VOC layout into `root` (created if missing).

    Layout: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette
    PNG, values are class indices, no 255), ``ImageSets/Segmentation/
    {train,val}.txt`` and ``classes.txt``. Every file is written atomically
    and ``classes.txt`` last, so its presence marks a complete data set.
    """
    _validate(num_train, num_val, min_size, max_size, seed)
    root = pathlib.Path(root)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    # A previous complete run's marker must not vouch for a half-rewritten folder.
    (root / "classes.txt").unlink(missing_ok=True)

    for split, count in (("train", num_train), ("val", num_val)):
        ids = [f"{split}_{index:04d}" for index in range(count)]
        for index, image_id in enumerate(ids):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
            _write_pair(root, image_id, *_render(rng, min_size, max_size))
        _write_text(root / "ImageSets" / "Segmentation" / f"{split}.txt", ids)

    _write_text(root / "classes.txt", DEMO_CLASSES)


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
