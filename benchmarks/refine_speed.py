#!/usr/bin/env python
"""Refine stage throughput, measured side by side in one run on a finished run folder.

* CRF pseudo masks with ``refine.workers`` 1 and 2 (images per second, same images);
* the random walk alone (AffinityNet embeddings + walk, per image), when the run folder
  holds a trained AffinityNet (``refine.method: affinity`` was run);
* the size of the CAM files (bytes per image).

    .venv/bin/python benchmarks/refine_speed.py --run-dir runs/demo-weak [--config configs/demo.yaml] \
        [--set KEY=VALUE ...] [--images 100]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.data import normalize, open_dataset, prepare_data  # noqa: E402
from pipeline.models import AffinityNet  # noqa: E402
from pipeline.runtime import configure_threads, select_device  # noqa: E402
from pipeline.train import load_checkpoint  # noqa: E402
from stages.cam import load_cams  # noqa: E402
from stages.refine import AFFINITY_NET, propagated_scores, write_crf_masks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--images", type=int, default=100)
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

    for workers in (1, 2):
        cfg.refine.workers = workers
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            write_crf_masks(cfg, args.run_dir, ids, Path(scratch) / "crf")
            elapsed = time.perf_counter() - started
        print(f"CRF masks, {workers} worker(s): {len(ids) / elapsed:.1f} images/s ({elapsed / len(ids):.3f} s/image)")

    net_file = args.run_dir / AFFINITY_NET / "model.pt"
    if not net_file.exists():
        print(f"no {net_file}: random walk not timed")
        return
    device = select_device(cfg.device)
    net_cfg = cfg.refine.affinity
    model = AffinityNet(net_cfg.backbone, net_cfg.feature_stride, net_cfg.embedding_channels)
    load_checkpoint(net_file, model)
    model.to(device).eval()
    timed, walked = 0.0, 0
    for image_id in ids:
        cams, classes = load_cams(cam_dir, image_id)
        if len(classes) == 0:  # all background: the stage does not walk these
            continue
        image = normalize(dataset.load_image(image_id)).to(device)
        started = time.perf_counter()
        propagated_scores(model, image, cams, cfg.refine.random_walk)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timed += time.perf_counter() - started
        walked += 1
    print(f"random walk ({cfg.refine.random_walk.iterations} steps, radius {cfg.refine.random_walk.radius}, "
          f"embeddings included), {device}: {timed / max(walked, 1):.3f} s/image over {walked} images")


if __name__ == "__main__":
    main()
