#!/usr/bin/env python
"""What the refine stage sees and makes, one row per image: the photo, its ground truth, the
CAMs' argmax at ``cam.bg_threshold``, the CRF labels the relation network learnt from
(unsure in VOC's cream colour), the walked pseudo mask, and (irn) the boundary map.

Reads a finished refine run of method affinity or irn (``<run-dir>/cam``, ``<run-dir>/refine``
and the network's folder); give the same --config and --set as the run.

    .venv/bin/python benchmarks/refine_montage.py --run-dir runs/msrc16-irn --config configs/msrc.yaml \\
        --set data.root=../shared/data/msrc-dev --set refine.method=irn --every 40 --out docs/img/x.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.methods.cams import cam_to_label
from pipeline.core.config_file import load_config
from pipeline.data.training_set import normalize
from pipeline.data.dataset import open_dataset
from pipeline.core.io import load_mask, voc_palette
from pipeline.core.training import load_checkpoint
from stages.cam import load_cams  # noqa: E402
from stages.refine import NETWORKS, build_relation_net  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--every", type=int, default=40, help="every n-th scored train image (from the 3rd)")
    parser.add_argument("--height", type=int, default=120, help="each row's height in pixels")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    if cfg.refine.method == "crf":
        sys.exit("error: refine.method is crf: the montage shows a relation network's labels and walk")
    dataset = open_dataset(cfg.data)
    palette = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    net_dir = args.run_dir / NETWORKS[cfg.refine.method]
    net = build_relation_net(cfg.refine)
    load_checkpoint(net_dir / "model.pt", net)
    net.eval()
    ids = [i for i in dataset.split_ids(cfg.data.train_split) if dataset.has_mask(i)][2::args.every]
    rows = []
    for image_id in ids:
        image = dataset.load_image(image_id)
        cams, classes = load_cams(args.run_dir / "cam" / "cams", image_id)
        tiles = [image, palette[dataset.load_mask(image_id)],
                 palette[cam_to_label(cams, classes, cfg.cam.bg_threshold)],
                 palette[load_mask(net_dir / "crf" / f"{image_id}.png")],
                 palette[load_mask(args.run_dir / "refine" / "pseudo" / f"{image_id}.png")]]
        if cfg.refine.method == "irn":
            with torch.no_grad():
                boundary = torch.sigmoid(net(normalize(image)[None]))[0, 0].numpy()
            grey = Image.fromarray((255 * boundary).astype(np.uint8)).resize(image.shape[1::-1], Image.BILINEAR)
            tiles.append(np.repeat(np.asarray(grey)[..., None], 3, axis=2))
        row = Image.fromarray(np.concatenate(tiles, axis=1))
        rows.append(np.asarray(row.resize((round(row.width * args.height / row.height), args.height), Image.NEAREST)))
    width = max(row.shape[1] for row in rows)
    montage = np.concatenate([np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255)
                              for row in rows])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(montage).save(args.out)
    print(f"{args.out}: {len(rows)} images, columns: photo, ground truth, CAM, network's labels, pseudo mask"
          + (", boundary" if cfg.refine.method == "irn" else ""))


if __name__ == "__main__":
    main()
