#!/usr/bin/env python
"""How much of a class a run's predictions put far from where the ground truth has it: for
every predicted mask that has a ground-truth mask in the data folder, the predicted pixels of
``--class`` farther than ``--distance`` pixels from the nearest true pixel of that class (all
of them when the ground truth has none). A rise in HD95 with a rise in Dice usually means such
stray pixels; this counts them:

    python tools/stray_pixels.py --data-root ../shared/data/acdc-dev \\
        --predictions runs/acdc19-mixed-kl-entropy/seg/predictions --class myocardium [--distance 20]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.core.errors import PipelineError
from pipeline.core.io import load_mask
from pipeline.data.dataset import read_classes
from tools import report_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, type=Path, help="VOC-layout folder with classes.txt")
    parser.add_argument("--predictions", required=True, type=Path, help="folder of predicted <id>.png masks")
    parser.add_argument("--class", dest="name", required=True)
    parser.add_argument("--distance", type=float, default=20.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        classes = read_classes(args.data_root)
        if args.name not in classes:
            raise PipelineError(f"class {args.name!r} is not in {args.data_root / 'classes.txt'}")
        if not args.predictions.is_dir():
            raise PipelineError(f"--predictions {args.predictions} is not a folder")
        if not args.distance >= 0:
            raise PipelineError(f"--distance is {args.distance:g}; give a number of pixels, 0 or more")
        index = classes.index(args.name)
        far = total = images = 0
        for path in sorted(args.predictions.glob("*.png")):
            truth_path = args.data_root / "SegmentationClass" / path.name
            if not truth_path.is_file():
                continue
            predicted = load_mask(path) == index
            truth = load_mask(truth_path) == index
            if predicted.shape != truth.shape:
                raise PipelineError(f"{path} is {predicted.shape[1]}x{predicted.shape[0]} px, "
                                    f"{truth_path} {truth.shape[1]}x{truth.shape[0]}")
            if not predicted.any():
                continue
            distance = ndimage.distance_transform_edt(~truth) if truth.any() else np.full(truth.shape, np.inf)
            stray = int(np.count_nonzero(distance[predicted] > args.distance))
            far, total, images = far + stray, total + int(predicted.sum()), images + (stray > 0)
    except (PipelineError, OSError, ValueError) as error:
        return report_error(error)
    print(f"{args.predictions}: {far} of {total} predicted {args.name} pixels "
          f"({100 * far / max(total, 1):.2f}%) lie more than {args.distance:g} px from the true {args.name}, "
          f"in {images} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
