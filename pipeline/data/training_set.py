"""What a training step reads: normalised images, multi-hot image labels, pixel labels from
a mask folder, and the random scale, flip, rotation, colour jitter and crop of :class:`TrainingSet`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torchvision
from PIL import Image

from pipeline.core.config import TrainConfig
from pipeline.core.io import load_mask
from pipeline.data.dataset import IGNORE, VOCDataset

# Images are normalised with the ImageNet statistics whatever the initialisation, so
# pretrained and random backbones see the same input range.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MEAN_COLOUR = tuple(int(round(255 * m)) for m in MEAN)  # normalised to about zero, as padding is


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
    """Random rescale, horizontal flip, rotation, pad and crop of an image and its pixel labels,
    as ``augment`` (a stage's ``train`` section) sets them.

    ``pixel_labels`` maps item keys to id -> uint8 mask functions (ground truth, pseudo
    masks, weak labels), e.g. ``{"mask": dataset.load_train_mask}``; every mask gets the
    image's augmentation. Without it only the image-level labels are returned (CAM training).
    """

    def __init__(self, dataset: VOCDataset, ids: list[str], augment: TrainConfig,
                 pixel_labels: Optional[dict[str, Callable[[str], np.ndarray]]] = None):
        self.dataset = dataset
        self.ids = ids
        self.crop_size = augment.crop_size
        self.scale_range = augment.scale_range
        self.pixel_labels = pixel_labels or {}
        # The image only; no draw at all without it, so runs without jitter keep their augmentations.
        jitter = augment.color_jitter
        self.jitter = torchvision.transforms.ColorJitter(*jitter) if jitter else None
        self.rotation = augment.rotation  # likewise: 0 draws nothing

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
        if self.rotation:
            angle = (2 * torch.rand(()).item() - 1) * self.rotation
            image = image.rotate(angle, Image.BILINEAR, fillcolor=MEAN_COLOUR)
            masks = {key: mask.rotate(angle, Image.NEAREST, fillcolor=IGNORE) for key, mask in masks.items()}
        image_t, masks_t = self._pad_and_crop(
            normalize(np.array(image)),
            {key: torch.from_numpy(np.array(mask, dtype=np.int64)) for key, mask in masks.items()})
        labels = multi_hot(self.dataset.image_labels(image_id), self.dataset.num_classes)
        return {"image": image_t, "labels": labels} | masks_t

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
