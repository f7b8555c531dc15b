#!/usr/bin/env python
"""Where a folder of pseudo masks goes wrong, against the ground truth of the train split: the
shares of the scored pixels that are background marked as a class, a class marked as
background, one class marked as another, and right; and what the ground truth holds under the
unsure pixels (255). Unsure counts as background in the first four shares, as in the argmax
protocol of refine's ``miou``. ``--class NAME`` (repeatable) adds what the masks call that
class's true pixels (the labels that take at least 1% of them, unsure included). Give the config
(and --set) of the run that made the masks:

    python tools/mask_errors.py --masks runs/m16/refine/pseudo --config configs/msrc.yaml \\
        --set data.root=../shared/data/msrc-dev --class face
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pipeline.core.config_file import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.io import load_mask
from pipeline.core.metrics import confident_confusion_matrix, confusion_matrix
from pipeline.data.dataset import IGNORE, open_dataset
from tools import report_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--masks", type=Path, required=True, help="a folder of <id>.png pseudo masks")
    parser.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME",
                        help="also print what the masks call this class's true pixels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.masks.is_dir():
            raise PipelineError(f"--masks {args.masks} is not a folder")
        cfg = load_config(args.config, args.overrides)
        dataset = open_dataset(cfg.data)
        unknown = [name for name in args.classes if name not in dataset.classes]
        if unknown:
            raise PipelineError(f"--class {unknown[0]} is not a class of {dataset.root} "
                                f"({', '.join(dataset.classes)})")
        # The two matrices refine scores its masks with: unsure as background, and sure pixels only.
        confusion = np.zeros((dataset.num_classes,) * 2, dtype=np.int64)
        sure = confusion.copy()
        images = 0
        for image_id in dataset.split_ids(cfg.data.train_split):
            path = args.masks / f"{image_id}.png"
            if not (dataset.has_mask(image_id) and path.is_file()):
                continue
            gt, mask = dataset.load_mask(image_id), load_mask(path)
            if mask.shape != gt.shape:
                raise PipelineError(f"{path} is {mask.shape[1]}x{mask.shape[0]} px, its ground truth "
                                    f"{gt.shape[1]}x{gt.shape[0]}")
            images += 1
            confusion += confusion_matrix(gt, np.where(mask == IGNORE, 0, mask), dataset.num_classes)
            sure += confident_confusion_matrix(gt, mask, dataset.num_classes)
        if not images:
            raise PipelineError(f"no mask in {args.masks} belongs to a train image with ground truth")
    except (PipelineError, OSError, ValueError) as error:
        return report_error(error)
    total = int(confusion.sum())
    right = int(np.trace(confusion))
    counts = {"background marked as a class": int(confusion[0, 1:].sum()),
              "class marked as background": int(confusion[1:, 0].sum()),
              "class marked as another class": int(confusion[1:, 1:].sum()) - (right - int(confusion[0, 0])),
              "right": right}
    print(f"{images} images, {total} scored pixels")
    for name, count in counts.items():
        print(f"{name}: {100 * count / total:.1f}%")
    unsure_by_truth = confusion.sum(axis=1) - sure.sum(axis=1)
    unsure = int(unsure_by_truth.sum())
    if unsure:
        print(f"unsure: {100 * unsure / total:.1f}% of the pixels, of which background in the ground truth: "
              f"{100 * unsure_by_truth[0] / unsure:.1f}%")
    for name in args.classes:
        print(class_labels(name, dataset.classes, sure, unsure_by_truth))
    return 0


def class_labels(name: str, classes: list[str], sure: np.ndarray, unsure_by_truth: np.ndarray) -> str:
    """One line: the shares of class ``name``'s true pixels by the label the masks give them."""
    k = classes.index(name)
    counts = dict(zip(classes, sure[k].tolist())) | {"unsure": int(unsure_by_truth[k])}
    total = sum(counts.values())
    if not total:
        return f"{name}: no pixel of it in the ground truth"
    shares = sorted(((count / total, label) for label, count in counts.items()), reverse=True)
    return f"{name}, {total} true pixels, marked: " + ", ".join(
        f"{label} {100 * share:.1f}%" for share, label in shares if share >= 0.01)


if __name__ == "__main__":
    sys.exit(main())
