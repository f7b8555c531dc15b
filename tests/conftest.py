from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.io import save_mask
from run_pipeline import main

# `pipeline`, `stages`, `tools` and `run_pipeline` import as the installed project (`make setup`
# installs it in editable mode); ROOT is for the files the tests read (configs, scripts).
ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(ROOT / "configs" / "demo.yaml")


@pytest.fixture(autouse=True)
def one_torch_thread(request):
    """The unit tests run on one torch thread: their tensors are tiny, and two threads on a
    2-core machine that is busy elsewhere wait on each other (the fast set took 3x as long).
    The end-to-end tests keep the threads their runs set (the config's ``num_threads``)."""
    if "e2e" in request.keywords:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_voc_folder(root: Path, masks: dict, classes=("background", "cat", "dog"), splits=None, gray=False):
    """A small VOC-layout folder: one image per mask, coloured by class so edges are visible."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    colours = np.array([[40, 90, 40], [220, 60, 60], [60, 60, 220]] + [[200, 200, 0]] * 253, dtype=np.uint8)
    for image_id, mask in masks.items():
        rgb = colours[mask]
        image = Image.fromarray(rgb[..., 0] if gray else rgb)
        image.save(root / "JPEGImages" / f"{image_id}.png")
        save_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
    splits = splits or {"train": list(masks), "val": list(masks)}
    for split, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def two_object_mask(size=32, cls_a=1, cls_b=2):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[4:14, 4:14] = cls_a
    mask[18:28, 16:30] = cls_b
    return mask


@pytest.fixture
def voc_folder(tmp_path):
    masks = {"a": two_object_mask(), "b": two_object_mask(cls_b=1), "empty": np.zeros((24, 40), np.uint8)}
    masks["b"][0, :] = 255
    return write_voc_folder(tmp_path / "voc", masks, splits={"train": ["a", "b", "empty"], "val": ["a"]})


# The demo at test size: real networks, real CRF, real files, one epoch each.
TINY = [
    "demo.num_train=24", "demo.num_val=8", "demo.min_size=48", "demo.max_size=64",
    "num_threads=2", "refine.workers=2",
    "cam.train.epochs=1", "cam.train.batch_size=8", "cam.train.crop_size=48", "cam.scales=[1.0, 0.5]",
    "seg.train.epochs=1", "seg.train.batch_size=8", "seg.train.crop_size=48",
]


def run(tmp_path, *args):
    """The CLI on the tiny demo in ``tmp_path``; a later ``--run-dir`` in ``args`` wins."""
    argv = ["--config", DEMO_CONFIG, "--run-dir", str(tmp_path / "run")]
    for item in TINY + [f"data.root={tmp_path / 'demo'}"]:
        argv += ["--set", item]
    return main(argv + list(args))
