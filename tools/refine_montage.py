#!/usr/bin/env python
"""A picture of what the refine stage sees and makes, one row per image: the photo, its ground
truth, the CAMs' argmax at ``cam.bg_threshold``, the CRF labels the relation network learnt
from (unsure in VOC's cream colour), the walked pseudo mask, and (irn) the boundary map. Reads
a finished refine run of method affinity or irn (``<run-dir>/cam``, ``<run-dir>/refine`` and
the network's folder); give the same --config and --set as the run:

    python tools/refine_montage.py --run-dir runs/msrc16-irn --config configs/msrc.yaml \\
        --set data.root=../shared/data/msrc-dev --set refine.method=irn --every 40 --out docs/img/x.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.core.config_file import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.io import load_mask, voc_palette
from pipeline.core.training import load_checkpoint
from pipeline.data.dataset import open_dataset
from pipeline.data.training_set import normalize
from pipeline.methods.cams import cam_to_label, load_cams
from pipeline.refinement import METHODS, method_for
from tools import report_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--every", type=int, default=40, help="every n-th scored train image (from the 3rd)")
    parser.add_argument("--height", type=int, default=120, help="each row's height in pixels")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def row(dataset, image_id: str, cfg, run_dir: Path, net_dir: Path, net, palette: np.ndarray,
        height: int) -> np.ndarray:
    """One image's tiles side by side, ``height`` pixels high."""
    image = dataset.load_image(image_id)
    cams, classes = load_cams(run_dir / "cam" / "cams", image_id)
    tiles = [image, palette[dataset.load_mask(image_id)],
             palette[cam_to_label(cams, classes, cfg.cam.bg_threshold)],
             palette[load_mask(net_dir / "crf" / f"{image_id}.png")],
             palette[load_mask(run_dir / "refine" / "pseudo" / f"{image_id}.png")]]
    if cfg.refine.method == "irn":
        with torch.no_grad():
            boundary = torch.sigmoid(net(normalize(image)[None]))[0, 0].numpy()
        grey = Image.fromarray((255 * boundary).astype(np.uint8)).resize(image.shape[1::-1], Image.BILINEAR)
        tiles.append(np.repeat(np.asarray(grey)[..., None], 3, axis=2))
    if len({tile.shape[:2] for tile in tiles}) > 1:
        raise PipelineError(f"image {image_id}: the run's files are not of the image's size; give the run's "
                            "--config and --set")
    joined = Image.fromarray(np.concatenate(tiles, axis=1))
    return np.asarray(joined.resize((round(joined.width * height / joined.height), height), Image.NEAREST))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.every < 1 or args.height < 1:
            raise PipelineError(f"--every ({args.every}) and --height ({args.height}) must be 1 or more")
        cfg = load_config(args.config, args.overrides)
        method = method_for(cfg)
        if method.network_folder is None:
            walks = [name for name, walk in METHODS.items() if walk.network_folder]
            raise PipelineError(f"refine.method is {cfg.refine.method}: the montage shows a relation "
                                f"network's labels and walk ({' or '.join(walks)})")
        net_dir = args.run_dir / method.network_folder
        checkpoint = net_dir / "model.pt"
        if not checkpoint.is_file():
            raise PipelineError(f"{checkpoint} does not exist: give the run folder of a finished refine "
                                f"of method {cfg.refine.method}")
        dataset = open_dataset(cfg.data)
        palette = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
        net = method.build_network()
        try:
            load_checkpoint(checkpoint, net)
        except RuntimeError as error:
            raise PipelineError(f"{checkpoint} does not match the config's network: {error}") from None
        net.eval()
        ids = [i for i in dataset.split_ids(cfg.data.train_split) if dataset.has_mask(i)][2::args.every]
        if not ids:
            raise PipelineError("the train split has fewer than 3 images with masks: nothing to show")
        rows = [row(dataset, image_id, cfg, args.run_dir, net_dir, net, palette, args.height)
                for image_id in ids]
    except (PipelineError, OSError, ValueError) as error:
        return report_error(error)
    width = max(r.shape[1] for r in rows)
    montage = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                              for r in rows])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(montage).save(args.out)
    print(f"{args.out}: {len(rows)} images, columns: photo, ground truth, CAM, network's labels, pseudo mask"
          + (", boundary" if cfg.refine.method == "irn" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
