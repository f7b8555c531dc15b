"""Device, threads, seeds and the process topology.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment) every
process runs the whole pipeline: :func:`init_distributed` starts the process group (NCCL
on CUDA, gloo on the CPU), every per-image loop takes its share of ids from :func:`shard`,
scores are summed across processes (:func:`sum_across_ranks`), training wraps the model in
DistributedDataParallel (``pipeline/train.py``), and only the main process (rank 0) writes
manifests, checkpoints and the report, and prints.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import random
import sys
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from pipeline.core.errors import ConfigError

T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return rank() == 0


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device) -> None:
    """Joins the process group torchrun describes (nothing in a single process)."""
    if world_size() > 1 and not distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def destroy_process_group() -> None:
    dist.destroy_process_group()


def barrier() -> None:
    if distributed():
        dist.barrier()


def sum_across_ranks(values):
    """An array (or number) summed over every process; itself in a single process."""
    if not distributed():
        return values
    array = np.asarray(values)
    tensor = torch.as_tensor(array.astype(np.float64))  # exact for counts below 2^53
    dist.all_reduce(tensor)
    result = tensor.numpy().astype(array.dtype)
    return result if array.ndim else result.item()


def from_main_process(value):
    """The main process's ``value``, in every process."""
    if not distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of ``items`` (every world_size-th item, starting at its rank)."""
    return list(items[rank()::world_size()])


def select_device(name: str) -> torch.device:
    """The device of ``name`` (auto, cpu, cuda); on CUDA under torchrun, this process's GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is cuda but no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank())
    return torch.device("cuda", local_rank())


def configure_threads(num_threads: int) -> None:
    """torch's CPU threads: ``num_threads`` (0: torch's default, the cores), shared by the
    processes torchrun starts on this machine, at least one each."""
    total = num_threads or torch.get_num_threads()
    torch.set_num_threads(max(1, total // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """Lets glibc's malloc keep the memory a training step frees for the next step.

    By default glibc returns freed blocks above its mmap threshold (128 KiB, raised as it
    goes) and a heap top above 128 KiB to the OS, so every CPU training step faults its
    activations' pages in again. A fixed 32 MiB threshold (glibc's largest) and a 2 GiB trim
    threshold keep them (with the faster argmax of self_regulation.py: the demo's seg step 5%
    faster, 11% with Self-Regulation; docs/results.md, "Where a CPU training step's time
    goes"). The price: the process keeps its peak memory. Nothing changes where glibc is absent
    or ``MALLOC_*_THRESHOLD_`` is set.
    """
    if not sys.platform.startswith("linux") or any(
            key in os.environ for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


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
    The busy threads stay within torch's thread count: each worker runs one thread, and the
    parent gives up one torch thread per worker (keeping at least one) while they run.
    """
    if workers == 1:
        yield map(task, items)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - workers))
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread) as pool:
            yield pool.imap_unordered(task, items, chunksize=4)
    finally:
        torch.set_num_threads(threads)


def _one_thread() -> None:
    """A worker process runs one thread (OpenMP included, for the libraries it calls)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
