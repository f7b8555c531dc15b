#!/usr/bin/env python
"""The cam stage's training loop against a bare torchvision-style loop, side by side in one run.

Both train the same network (``CAMNet`` of the config's ``cam.backbone``, freshly seeded) for
one epoch on the same data (the cam stage's ``TrainingSet``: same images, crop, scale range
and loader workers), batch and threads:

* **ours**: ``pipeline.train.train`` with the cam stage's loss, its end-of-epoch checkpoint
  written to a scratch folder, as the stage runs it;
* **bare**: the loop of torchvision's ``references/segmentation/train.py``: forward, loss,
  ``zero_grad``, ``backward``, ``step``, a poly ``LambdaLR``, nothing else (on CUDA with the
  same autocast and channels-last memory format as ours).

The baseline loss only (``cam.sr.enabled`` is refused: the bare loop has no SR). The two
alternate for ``--rounds`` rounds, each round starting with the loop the last one ended
with (so that warm-up and load from elsewhere hit both alike); images/s per round and the
ratio ours/bare of the medians are printed.

Produced the table of docs/results.md, section "The cam training loop against a bare loop".

    .venv/bin/python benchmarks/train_loop_overhead.py [--config configs/demo.yaml] [--rounds 3] \\
        [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.core.config_file import load_config
from pipeline.core.runtime import configure_threads, keep_freed_memory, seed_everything, select_device
from pipeline.core.training import amp_dtype, make_optimizer, make_train_loader, train
from pipeline.data.dataset import open_dataset
from pipeline.data.prepare import prepare_data
from pipeline.data.training_set import TrainingSet
from pipeline.methods.losses import multilabel_loss
from pipeline.models.networks import CAMNet
from stages.cam import training_loss


def ours(model, loader, cfg, device, scratch: Path) -> None:
    train(model, loader, training_loss(cfg.cam.sr), cfg.cam.train, device, "ours", scratch / "checkpoint.pt")


def bare(model, loader, cfg, device, scratch: Path) -> None:
    optimizer = make_optimizer(model, cfg.cam.train)  # the same parameter groups and learning rates
    total = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / total) ** 0.9)
    precision = amp_dtype(cfg.cam.train.amp, device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.train()
    for batch in loader:
        image, labels = batch["image"].to(device), batch["labels"].to(device)
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            loss = multilabel_loss(model(image), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides + ["cam.train.epochs=1", "cam.train.steps=0"])
    if cfg.cam.sr.enabled:
        print("error: config key 'cam.sr.enabled' is true: the bare loop has no Self-Regulation loss "
              "to compare with", file=sys.stderr)
        sys.exit(2)
    prepare_data(cfg)
    configure_threads(cfg.num_threads)
    keep_freed_memory()  # as run_pipeline.py does
    device = select_device(cfg.device)
    dataset = open_dataset(cfg.data)
    train_set = TrainingSet(dataset, dataset.split_ids(cfg.data.train_split), cfg.cam.train)
    print(f"{len(train_set)} images, batch {cfg.cam.train.batch_size}, crop {cfg.cam.train.crop_size}, "
          f"{cfg.cam.backbone.name}, {device}, "
          f"torch threads {torch.get_num_threads()}, loader workers {cfg.data.loader_workers}; "
          "one epoch per run")
    rates = {"ours": [], "bare": []}
    loops = [("ours", ours), ("bare", bare)]
    for round_index in range(args.rounds):
        for name, loop in loops if round_index % 2 == 0 else loops[::-1]:
            generator = seed_everything(cfg.seed)
            model = CAMNet(cfg.cam.backbone, dataset.num_classes - 1, cfg.cam.sr).to(device)
            loader = make_train_loader(train_set, cfg.cam.train, cfg.data.loader_workers, generator)
            with tempfile.TemporaryDirectory() as scratch:
                started = time.perf_counter()
                loop(model, loader, cfg, device, Path(scratch))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - started
            rates[name].append(len(loader) * cfg.cam.train.batch_size / elapsed)
            print(f"round {round_index + 1}, {name}: {rates[name][-1]:.2f} images/s ({elapsed:.1f} s)",
                  flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"median images/s: ours {median['ours']:.2f}, bare {median['bare']:.2f}; "
          f"ratio ours/bare {median['ours'] / median['bare']:.3f}")


if __name__ == "__main__":
    main()
