#!/usr/bin/env python
"""How much of a class a run's predictions put far from where the ground truth has it.

For every predicted mask that has a ground-truth mask: the predicted pixels of ``--class``
farther than ``--distance`` pixels from the nearest true pixel of that class (all of them
when the ground truth has none). A rise in HD95 with a rise in Dice usually means such
stray pixels; this counts them.

    .venv/bin/python benchmarks/stray_pixels.py --data-root ../shared/data/acdc-dev \
        --predictions runs/acdc19-mixed-kl-entropy/seg/predictions --class myocardium [--distance 20]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.dataset import read_classes
from pipeline.core.errors import DataError
from pipeline.core.io import load_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, type=Path, help="VOC-layout folder with classes.txt")
    parser.add_argument("--predictions", required=True, type=Path, help="folder of predicted <id>.png masks")
    parser.add_argument("--class", dest="name", required=True)
    parser.add_argument("--distance", type=float, default=20.0)
    args = parser.parse_args()
    try:
        classes = read_classes(args.data_root)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if args.name not in classes:
        print(f"error: class {args.name!r} is not in {args.data_root / 'classes.txt'}", file=sys.stderr)
        sys.exit(2)
    index = classes.index(args.name)
    far = total = images = 0
    for path in sorted(args.predictions.glob("*.png")):
        truth_path = args.data_root / "SegmentationClass" / path.name
        if not truth_path.is_file():
            continue
        predicted = load_mask(path) == index
        truth = load_mask(truth_path) == index
        if not predicted.any():
            continue
        distance = ndimage.distance_transform_edt(~truth) if truth.any() else np.full(truth.shape, np.inf)
        stray = int(np.count_nonzero(distance[predicted] > args.distance))
        far, total, images = far + stray, total + int(predicted.sum()), images + (stray > 0)
    print(f"{args.predictions}: {far} of {total} predicted {args.name} pixels ({100 * far / max(total, 1):.2f}%) "
          f"lie more than {args.distance:g} px from the true {args.name}, in {images} images")


if __name__ == "__main__":
    main()
