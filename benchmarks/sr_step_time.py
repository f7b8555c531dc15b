#!/usr/bin/env python
"""What Self-Regulation costs, on the demo-sized input (CPU, 2 threads by default).

(a) Training step time (forward, loss, backward, SGD step) with SR vs without, same
    batch of 16 random 96x96 crops, resnet18, 8 classes, for the CAM and the seg network:
    the median of several repetitions after warm-up, the two variants interleaved so that
    load from other processes hits both alike.
(b) Prediction time of the inference network rebuilt from an SR-trained checkpoint vs the
    baseline network (CAMs: 4 scales + flip; segmentation: flip), and parameter counts.

Produced the tables of docs/results.md, section "Self-Regulation: what it costs".

    .venv/bin/python benchmarks/sr_step_time.py [--repeats 7] [--threads 2] \\
        [--set seg.sr.head_channels=32 ...]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core.config import SRConfig
from pipeline.core.config_file import apply_override, config_from_dict
from pipeline.core.runtime import keep_freed_memory
from pipeline.core.training import load_checkpoint, make_optimizer, save_checkpoint
from pipeline.methods.cams import multiscale_cams
from pipeline.models.networks import CAMNet, DeepLab, predict_batch
from stages import cam as cam_stage
from stages import seg as seg_stage

BATCH, CROP, NUM_CLASSES, WARMUP = 16, 96, 8, 2
DEMO = {"backbone": {"name": "resnet18", "weights": None, "output_stride": 16},
        "train": {"batch_size": BATCH, "crop_size": CROP}}
STAGES = {"cam": cam_stage, "seg": seg_stage}
PAST_WARMUP = 10**6  # the epoch given to the loss: all three SR operations on


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed runs per variant (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of the SR variant, e.g. --set cam.sr.head_channels=32")
    return parser.parse_args()


def build(net: str, cfg, sr: SRConfig):
    torch.manual_seed(0)
    if net == "cam":
        return CAMNet(cfg.cam.backbone, NUM_CLASSES - 1, sr)
    return DeepLab(cfg.seg.backbone, NUM_CLASSES, cfg.seg.aspp_rates, sr)


def train_step(net: str, cfg, model, sr: SRConfig, batch: dict):
    """One SGD step of the stage's own loss, as a function of nothing."""
    optimizer = make_optimizer(model, getattr(cfg, net).train)
    compute = STAGES[net].training_loss(sr)

    def step():
        loss = compute(model, batch, PAST_WARMUP)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def predict(net: str, model, image: torch.Tensor):
    if net == "cam":
        classes = np.arange(1, NUM_CLASSES)
        return lambda: multiscale_cams(model, image, classes, [1.0, 0.5, 1.5, 2.0], flip=True)
    return lambda: predict_batch(model, [image], flip=True)


def interleaved_medians(runs: dict, repeats: int) -> dict:
    """Median seconds of each function; they run in turn, so that load from elsewhere hits all alike."""
    times = {name: [] for name in runs}
    for repeat in range(WARMUP + repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if repeat >= WARMUP:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def inference_from_checkpoint(net: str, cfg, trained):
    """The network a later stage or user gets from model.pt: built without SR, loaded strictly."""
    model = build(net, cfg, SRConfig(enabled=False))
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(Path(folder) / "model.pt", trained)
        load_checkpoint(Path(folder) / "model.pt", model)
    return model.eval()


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as run_pipeline.py does
    raw = {"cam": dict(DEMO, sr={"enabled": True}), "seg": dict(DEMO, sr={"enabled": True})}
    for item in args.overrides:
        apply_override(raw, item)
    cfg = config_from_dict(raw)
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(BATCH, 3, CROP, CROP, generator=generator),
             "labels": (torch.rand(BATCH, NUM_CLASSES - 1, generator=generator) < 0.3).float(),
             "mask": torch.randint(0, NUM_CLASSES, (BATCH, CROP, CROP), generator=generator)}
    image = torch.randn(3, 112, 112, generator=generator)  # a typical demo image (96..128 px)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"batch {BATCH} x 3 x {CROP} x {CROP}, resnet18, {NUM_CLASSES} classes; "
          f"median of {args.repeats} runs after {WARMUP} warm-up, interleaved")
    print("predict: one 112x112 image; cam: CAMs at 4 scales + flip, seg: prediction + flip")
    for net in ("cam", "seg"):
        sr = getattr(cfg, net).sr
        print(f"{net}.sr: exits {','.join(sr.exits)}, head_channels {sr.head_channels}, form {sr.form}")
    print(f"\n{'net':<5}{'measure':<26}{'baseline':>12}{'SR':>12}{'ratio':>8}")
    for net in ("cam", "seg"):
        baseline_sr, sr = SRConfig(enabled=False), getattr(cfg, net).sr
        baseline, trained = build(net, cfg, baseline_sr).train(), build(net, cfg, sr).train()
        steps = interleaved_medians({"base": train_step(net, cfg, baseline, baseline_sr, batch),
                                     "sr": train_step(net, cfg, trained, sr, batch)}, args.repeats)
        inference = inference_from_checkpoint(net, cfg, trained)
        predicts = interleaved_medians({"base": predict(net, baseline.eval(), image),
                                        "sr": predict(net, inference, image)}, args.repeats)
        rows = [("train step (s)", steps["base"], steps["sr"], "{:.3f}"),
                ("predict, SR ckpt (ms)", predicts["base"] * 1000, predicts["sr"] * 1000, "{:.1f}"),
                ("params, training", count(baseline), count(trained), "{:,}"),
                ("params, SR ckpt", count(baseline), count(inference), "{:,}")]
        for measure, base, with_sr, fmt in rows:
            print(f"{net:<5}{measure:<26}{fmt.format(base):>12}{fmt.format(with_sr):>12}"
                  f"{with_sr / base:>7.2f}x")


if __name__ == "__main__":
    main()
