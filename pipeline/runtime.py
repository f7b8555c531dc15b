"""Device, threads, seeds and the process topology.

Every per-image loop takes its share of ids from :func:`shard` and every training loop
checks :func:`is_main_process` before logging or writing, so launching the same code
with ``torchrun`` (one process per GPU, ``RANK``/``WORLD_SIZE`` in the environment) only
needs the process group and the DistributedDataParallel wrapper added in one place.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from pipeline.errors import ConfigError

T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of ``items`` (every world_size-th item, starting at its rank)."""
    return list(items[rank()::world_size()])


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is cuda but no CUDA device is available")
    return torch.device(name)


def configure_threads(num_threads: int) -> None:
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def seed_everything(seed: int) -> torch.Generator:
    """Seeds Python, NumPy and torch; returns a generator for DataLoader shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def rng_state() -> dict:
    """The states of Python's, NumPy's and torch's global generators, as tensors and plain
    values (a checkpoint of them loads with ``torch.load(..., weights_only=True)``)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": (version, torch.tensor(internal, dtype=torch.int64), gauss),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def parallel_map(task: Callable, items: Iterable, workers: int) -> Iterator[Iterator]:
    """Results of ``task`` over ``items`` (in any order) from ``workers`` processes.

    fork, not spawn: workers inherit the already opened data set and start at once; the
    tasks given here use NumPy and pydensecrf only, never torch. ``items`` may be a lazy
    iterable: the parent computes it (torch allowed there) while the workers take tasks.
    """
    if workers == 1:
        yield map(task, items)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield pool.imap_unordered(task, items, chunksize=4)
