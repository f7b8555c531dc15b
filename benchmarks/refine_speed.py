#!/usr/bin/env python
"""Refine stage throughput, measured side by side in one run on a finished run folder.

* CRF pseudo masks with ``refine.workers`` 1 and 2 (images per second, same images);
* the random walk of ``refine.method`` (affinity or irn) per image, with its network's forward
  pass and without (the network alone timed beside it), when the run folder holds that trained
  network; ``--save-masks DIR`` writes the walked masks as the stage makes them, so that two
  versions of the code can be compared file by file;
* the size of the CAM files (bytes per image).

Produced the tables of docs/results.md, sections "Random walk speed: a sparse matrix product
per step" and "CRF throughput with 1 and 2 workers".

    .venv/bin/python benchmarks/refine_speed.py --run-dir runs/demo-weak [--config configs/demo.yaml] \
        [--set KEY=VALUE ...] [--images 100] [--walk-only] [--save-masks DIR]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core.config_file import load_config
from pipeline.core.io import save_mask
from pipeline.core.runtime import configure_threads, select_device
from pipeline.core.training import load_checkpoint
from pipeline.data.dataset import open_dataset
from pipeline.data.prepare import prepare_data
from pipeline.data.training_set import normalize
from pipeline.methods.cams import load_cams
from pipeline.refinement import method_for
from pipeline.refinement.masks import write_crf_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--save-masks", type=Path)
    parser.add_argument("--walk-only", action="store_true",
                        help="time the walk (with its network), not the CRF")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    prepare_data(cfg)
    configure_threads(cfg.num_threads)
    dataset = open_dataset(cfg.data)
    ids = dataset.split_ids(cfg.data.train_split)[:args.images]
    cam_dir = args.run_dir / "cam" / "cams"
    print(f"{len(ids)} images, {cfg.data.root}; torch threads {torch.get_num_threads()}")

    sizes = [(cam_dir / f"{i}.npz").stat().st_size for i in ids]
    print(f"CAM files: {np.mean(sizes):.0f} bytes per image (float16, the image's classes only)")

    for workers in () if args.walk_only else (1, 2):
        cfg.refine.workers = workers
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            write_crf_masks(cfg, args.run_dir, ids, Path(scratch) / "crf", keep=False)
            elapsed = time.perf_counter() - started
        print(f"CRF masks, {workers} worker(s): {len(ids) / elapsed:.1f} images/s "
              f"({elapsed / len(ids):.3f} s/image)")

    method = method_for(cfg)
    net_file = args.run_dir / method.network_folder / "model.pt" if method.network_folder else None
    if net_file is None or not net_file.exists():
        print(f"no trained network for refine.method {cfg.refine.method} in {args.run_dir}: "
              "random walk not timed")
        return
    device = select_device(cfg.device)
    model = method.build_network()
    load_checkpoint(net_file, model)
    model.to(device).eval()
    network_seconds, walk_seconds, walked = 0.0, 0.0, 0
    for image_id in ids:
        cams, classes = load_cams(cam_dir, image_id)
        if len(classes) == 0:  # all background: the stage does not walk these
            continue
        image = normalize(dataset.load_image(image_id)).to(device)
        started = time.perf_counter()
        # As the walk runs it: IRNet's boundary map averages the image's and its mirror's.
        with torch.no_grad():
            model(method.network_batch(image))
        network_seconds += _synchronized(device, started)
        started = time.perf_counter()
        scores = method.walked_scores(model, image, cams)
        walk_seconds += _synchronized(device, started)
        walked += 1
        if args.save_masks is not None:  # as the stage makes them: float16 scores, then the mask
            stored = scores.astype(np.float16).astype(np.float32)
            mask = method.mask_from_scores()(dataset.load_image(image_id), stored, classes)
            args.save_masks.mkdir(parents=True, exist_ok=True)
            save_mask(args.save_masks / f"{image_id}.png", mask)
    walk = method.walk_cfg
    walked = max(walked, 1)
    print(f"{cfg.refine.method} walk ({walk.iterations} steps, radius {walk.radius}), {device}, "
          f"{walked} images: {walk_seconds / walked:.3f} s/image with the network, "
          f"of which the network alone {network_seconds / walked:.3f} s, "
          f"the walk {(walk_seconds - network_seconds) / walked:.3f} s")


def _synchronized(device: torch.device, started: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
