"""Post-processing of predicted masks: each class keeps only its largest connected component.

A heart has one right ventricle, one myocardium and one left ventricle, so a class's stray
blobs away from the heart are errors; keeping the largest component removes them, as nnU-Net's
post-processing and most ACDC entries do. Per 3-D volume where slices group into volumes (a
blob is stray when it touches the main one in no slice), else per 2-D image.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from pipeline.data.dataset import BACKGROUND, IGNORE

# id -> (volume, order in it), or None: the id is a 2-D image on its own
VolumeOf = Callable[[str], "tuple[str, tuple] | None"]


def largest_components(labels: np.ndarray) -> np.ndarray:
    """``labels`` (2-D or 3-D class indices) with every class but the background reduced to its
    largest connected component (face-connected: 4 neighbours in 2-D, 6 in 3-D); the removed
    pixels become background."""
    out = labels.copy()
    for value in np.unique(labels):
        if value in (BACKGROUND, IGNORE):
            continue
        components, count = ndimage.label(labels == value)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[(components > 0) & (components != 1 + int(sizes.argmax()))] = BACKGROUND
    return out


def keep_largest_components(masks: dict[str, np.ndarray],
                            volume_of: VolumeOf | None) -> dict[str, np.ndarray]:
    """``masks`` (id -> 2-D mask) post-processed: per volume (the slices stacked in order) where
    ``volume_of`` places the id in one, else per image; a volume whose slices differ in size
    (which data checks refuse in a data set) per image."""
    groups: dict[str, list[tuple[tuple, str]]] = {}
    result = {}
    for image_id, mask in masks.items():
        place = volume_of(image_id) if volume_of is not None else None
        if place is None:
            result[image_id] = largest_components(mask)
        else:
            groups.setdefault(place[0], []).append((place[1], image_id))
    for slices in groups.values():
        ordered = [image_id for _, image_id in sorted(slices)]
        if len({masks[image_id].shape for image_id in ordered}) > 1:
            result.update((image_id, largest_components(masks[image_id])) for image_id in ordered)
            continue
        stack = largest_components(np.stack([masks[image_id] for image_id in ordered]))
        result.update(zip(ordered, stack))
    return result
