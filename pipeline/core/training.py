"""The training loop shared by every stage: SGD (or Adam), poly learning rate, tqdm progress.

A stage supplies the model, the data set and a ``compute_loss(model, batch, epoch)``
(epoch 0-based, for schedules such as Self-Regulation's warm-up) that returns a dict
of named loss terms with the total under "loss".

Under torchrun (``pipeline/runtime.py``) the loader gives each process its share of every
batch (``batch_size`` is the batch of all processes together: a DistributedSampler seeded
per epoch, or every world_size-th image of each batch of a batch sampler), and the model
goes through DistributedDataParallel, which averages the gradients, so the step is the
single-process step on the whole batch (BatchNorm statistics are per process unless
``train.sync_batchnorm``). Only the main process writes the checkpoint.
"""
from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from timm.layers import convert_sync_batchnorm
from tqdm import tqdm

from pipeline.core.config import TrainConfig
from pipeline.core.errors import ConfigError, TrainingError
from pipeline.core.io import atomic_write_bytes
from pipeline.core.runtime import (
    distributed,
    is_main_process,
    rank,
    rng_state,
    set_rng_state,
    sum_across_ranks,
    world_size,
)

LossFn = Callable[[nn.Module, dict, int], dict]


# Training-only submodules (the Self-Regulation heads, copy-paste's EMA copy): not part of the
# saved inference network.
TRAINING_ONLY_PREFIXES = ("sr_heads.", "ema.")


def make_train_loader(dataset, cfg: TrainConfig, workers: int, generator: torch.Generator,
                      batch_sampler=None):
    """Shuffled full batches, or the batches of ``batch_sampler`` (mixed mode's fixed composition);
    under torchrun this process's share of each."""
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"{len(dataset)} training images are fewer than one batch of {cfg.batch_size}")
    if batch_sampler is not None:
        if world_size() > 1:
            batch_sampler = RankShare(batch_sampler)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                           generator=generator)
    if world_size() > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=generator.initial_seed(),
                                                      drop_last=True)
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size // world_size(),
                                           sampler=sampler, num_workers=workers, generator=generator,
                                           drop_last=True, pin_memory=torch.cuda.is_available())
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, generator=generator,
        pin_memory=torch.cuda.is_available(),
        # Full batches only: BatchNorm (and ASPP's pooled branch) needs more than one sample.
        # Workers start afresh every epoch, seeded from the generator: a resumed training,
        # which restores the generator, then draws the same augmentations.
        drop_last=True,
    )


class RankShare:
    """This process's share of every batch of a batch sampler that each process builds alike
    (same seed): every world_size-th index, from its rank on."""

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            yield batch[rank()::world_size()]

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


class Methods(nn.Module):
    """Lets DistributedDataParallel run any of the model's forward methods: ``forward_exits``
    and the like must pass through the DDP wrapper's call for its gradient hooks to fire."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


class DistributedModel:
    """What ``compute_loss`` sees under torchrun: the model's methods, each called through DDP."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        # SR heads and the mixed teacher are unused by some forwards: DDP must not wait for them.
        self.ddp = nn.parallel.DistributedDataParallel(Methods(model),
                                                       device_ids=[device] if device.type == "cuda" else None,
                                                       find_unused_parameters=True)

    def __call__(self, *args, **kwargs):
        return self.ddp("forward", *args, **kwargs)

    def __getattr__(self, name: str):
        value = getattr(self.model, name)
        if callable(value) and name.startswith("forward"):
            return lambda *args, **kwargs: self.ddp(name, *args, **kwargs)
        return value


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    new = {id(p) for p in model.new_parameters()}
    pretrained = [p for p in model.parameters() if id(p) not in new]
    groups = [{"params": pretrained, "lr": cfg.lr, "base_lr": cfg.lr},
              {"params": model.new_parameters(), "lr": cfg.lr * cfg.head_lr_mult,
               "base_lr": cfg.lr * cfg.head_lr_mult}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.momentum, 0.99), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train(model: nn.Module, loader, compute_loss: LossFn, cfg: TrainConfig, device: torch.device,
          desc: str, checkpoint: Path | None = None) -> list[dict[str, float]]:
    """Trains in place for ``epochs(cfg, loader)`` epochs; returns, per epoch, the mean of each
    term ``compute_loss`` returns (the total under "loss"). With ``checkpoint`` the training
    state is written there at the end of every epoch, and a training that finds one continues
    after its epoch (see :func:`training_state`)."""
    if distributed() and cfg.sync_batchnorm:
        # timm's conversion also keeps the activation inside EfficientNet's BatchNormAct2d layers,
        # which torch's drops; the layers' parameters are shared with the model.
        model = convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, cfg)
    precision = amp_dtype(cfg.amp, device)
    # fp16 gradients underflow unscaled.
    scaler = torch.amp.GradScaler("cuda", enabled=precision == torch.float16)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net = DistributedModel(model, device) if distributed() else model
    num_epochs = epochs(cfg, loader)
    total_steps = num_epochs * len(loader)
    history = []
    if checkpoint is not None and checkpoint.is_file():
        history = restore_training(checkpoint, model, optimizer, loader, scaler)
        if is_main_process():
            tqdm.write(f"{desc}: resuming after epoch {len(history)}/{num_epochs} from {checkpoint}")
    step = len(history) * len(loader)
    model.train()
    for epoch in range(len(history), num_epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # diagnostics may be undefined (NaN) in a batch: averaged where defined
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{num_epochs}", leave=False,
                   disable=not is_main_process())
        for batch_index, batch in enumerate(bar, start=1):
            # The poly schedule, as in DeepLab, in closed form: torch's PolynomialLR multiplies the
            # rate step by step, which differs in the last bits (at 285 of 300 steps) and so
            # would move every recorded result; this form also resumes at any step as it is.
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * (1 - step / total_steps) ** 0.9
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
                terms = compute_loss(net, batch, epoch)
            loss = terms["loss"].item()
            if not math.isfinite(loss):  # the stage's partial folder is deleted: nothing is cached
                raise TrainingError(f"{desc}: the loss is {loss} at epoch {epoch + 1}, step {batch_index}; "
                                    "nothing was cached (a lower learning rate may help)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            for name, value in terms.items():
                value = loss if name == "loss" else value.item()
                if math.isfinite(value):
                    sums[name], counts[name] = sums.get(name, 0.0) + value, counts.get(name, 0) + 1
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in terms.items()}
                            | {"avg": f"{sums['loss'] / batch_index:.3f}"})
        # The same names in every process.
        sums = {name: sum_across_ranks(sums.get(name, 0.0)) for name in terms}
        counts = {name: sum_across_ranks(counts.get(name, 0)) for name in terms}
        history.append({name: sums[name] / counts[name] if counts[name] else math.nan for name in terms})
        if is_main_process():
            tqdm.write(f"{desc} epoch {epoch + 1}/{num_epochs}: "
                       + ", ".join(f"{name} {value:.4f}" for name, value in history[-1].items()))
        if checkpoint is not None and is_main_process():
            atomic_write_bytes(checkpoint,
                               _to_bytes(training_state(model, optimizer, loader, history, scaler)))
    model.eval()
    if world_size() > 1:  # every process says so: training ran on each of them
        tqdm.write(f"{desc}: process {rank()} of {world_size()} trained {step} steps of "
                   f"{cfg.batch_size // world_size()} images", file=sys.stderr)
    return history


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device``; None: full precision."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("config key 'train.amp' is fp16, which needs a CUDA device; "
                          "use bf16 or off on the CPU")
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def epochs(cfg: TrainConfig, loader) -> int:
    """The number of epochs: ``cfg.epochs``, or with ``cfg.steps`` enough whole epochs of
    ``len(loader)`` batches for that many steps (the budget then follows the data set's size)."""
    return math.ceil(cfg.steps / len(loader)) if cfg.steps else cfg.epochs


def loss_curve(history: list[dict[str, float]], term: str = "loss") -> list[float]:
    """One term of :func:`train`'s history, per epoch, rounded for metrics.json (None where
    it was never defined in an epoch)."""
    return [round(epoch[term], 4) if math.isfinite(epoch[term]) else None for epoch in history]


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, loader, history: list[dict],
                   scaler: torch.amp.GradScaler) -> dict:
    """Everything an interrupted training needs to go on exactly as if uninterrupted at the end
    of an epoch: the model (its training-only submodules included), the optimiser, the losses so far,
    the global random generators, the loader's generator (shuffling, and each epoch's worker
    seeds) and a batch sampler's own state (mixed mode's queues)."""
    sampler = loader.batch_sampler
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
            "scaler": scaler.state_dict(),
            "rng": rng_state(), "loader_generator": loader.generator.get_state(),
            "batch_sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else None}


def restore_training(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, loader,
                     scaler: torch.amp.GradScaler) -> list[dict]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    loader.generator.set_state(state["loader_generator"])
    if state["batch_sampler"] is not None:
        loader.batch_sampler.load_state_dict(state["batch_sampler"])
    return list(state["history"])


def _to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(path: Path, model: nn.Module) -> None:
    """The inference network's state_dict, a plain dict of tensors (loadable with
    ``torch.load(..., weights_only=True)``); training-only submodules are left out, so it loads
    strictly into the same network built without them. Written by the main process only."""
    if not is_main_process():
        return
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    atomic_write_bytes(path, _to_bytes(state))


def load_checkpoint(path: Path, model: nn.Module) -> None:
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
