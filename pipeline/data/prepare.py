"""Before any stage runs: generate the demo data when the config asks for it, fall back to
another train split where the configured one is missing, and check every file and setting
that a stage would otherwise trip over half-way (one ``error:`` line, exit 2).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from pipeline.core.config import DataConfig
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.runtime import world_size
from pipeline.data.checks import FileChecks
from pipeline.data.dataset import SPLITS, VOCDataset, forget_opened_datasets, open_dataset
from pipeline.data.demo import ensure_demo_data
from pipeline.data.volumes import Volumes


def prepare_data(cfg, checks: Optional[FileChecks] = None) -> VOCDataset:
    """Generates the demo data set when the config asks for it, sets ``cfg.data`` to the train
    split in use (:func:`train_split_in_use`), then checks every listed id (``checks``
    remembers what was checked, so a rerun skips unchanged files, and times it)."""
    if cfg.demo is not None:
        ensure_demo_data(Path(cfg.data.root), cfg.demo)
    # The one place the config changes after loading, visibly: before any cache key is computed,
    # so the keys record the split that is used.
    cfg.data = train_split_in_use(cfg.data)
    forget_opened_datasets()  # the folder as it is now, not as an earlier run in this process saw it
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
    scored_splits = [data.val_split] + ([data.score_split] if data.score_split else [])
    dataset.validate(data.train_split, scored_splits, checks)
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
            raise ConfigError(f"config key '{section}.train.batch_size' is {train.batch_size}: under "
                              f"torchrun it is shared by {processes} processes, and each needs an equal "
                              "share of at least 2")
    return dataset


def train_split_in_use(data: DataConfig) -> DataConfig:
    """``data``, or a copy switched to ``fallback_train_split`` with SegmentationClass when the
    configured train split's list or mask folder is missing (VOC without the SBD
    augmentation), which it says on stderr."""
    root = Path(data.root)
    # With tags the train masks are for scores only: whether they exist must not change the training set.
    needed = [root / SPLITS / f"{data.train_split}.txt"] + ([] if data.tags or data.image_labels else
                                                             [root / data.train_masks])
    missing = [str(p) for p in needed if not p.exists()]
    if data.fallback_train_split is None or not missing or data.train_split == data.fallback_train_split:
        return data
    print(f"note: {missing[0]} not found; training on split {data.fallback_train_split!r} with "
          "SegmentationClass (data.fallback_train_split)", file=sys.stderr)
    return dataclasses.replace(data, train_split=data.fallback_train_split, train_masks="SegmentationClass")
