#!/usr/bin/env python
"""Ground truth never reaches weak training: the weak pipeline on a copy of a data set whose
train masks are removed (a tags file written from them instead) must give bit-identical
CAMs, pseudo masks and seg predictions to the run on the original folder.

Makes the copy under --work, runs the pipeline on both folders (each a fresh run folder,
same config, seed and threads), then reruns the original's command with every stage cached
to time the data check a second time, and compares the outputs file by file. Prints a
summary and writes it to <work>/identity.json.

Produced the table of docs/results.md, section "Own data: tags without masks" (its original
run is the weak row of the section "MSRC").

    .venv/bin/python benchmarks/tags_only_identity.py --config configs/msrc.yaml \\
        --set data.root=../shared/data/msrc-dev --work runs/identity-msrc
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.core.config_file import load_config
from pipeline.core.io import load_arrays, load_mask
from pipeline.data.dataset import read_classes

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"cam/cams": "*.npz", "refine/pseudo": "*.png", "seg/predictions": "*.png"}


def tags_only_copy(root: Path, train_split: str, dest: Path) -> int:
    """Copies ``root`` to ``dest`` without the train ids' masks, plus ``tags.csv`` naming the
    classes those masks held; returns how many masks were removed."""
    shutil.copytree(root, dest)
    classes = read_classes(root)
    rows = []
    ids = (root / "ImageSets" / "Segmentation" / f"{train_split}.txt").read_text().split()
    for image_id in ids:
        mask_file = dest / "SegmentationClass" / f"{image_id}.png"
        present = np.unique(load_mask(mask_file))
        rows.append(f"{image_id},{';'.join(classes[k] for k in present if 0 < k < 255)}\n")
        mask_file.unlink()
    (dest / "tags.csv").write_text("id,tags\n" + "".join(rows))
    return len(ids)


def pipeline(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py")] + args, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"run_pipeline.py {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout


def same(a: Path, b: Path) -> bool:
    if a.suffix == ".npz":
        x, y = load_arrays(a), load_arrays(b)
        return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    return a.read_bytes() == b.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", required=True,
                        help="folder for the copy and both run folders (must not exist)")
    args = parser.parse_args()
    work = Path(args.work)
    if work.exists():
        sys.exit(f"error: --work {work} exists")
    cfg = load_config(args.config, args.overrides)
    removed = tags_only_copy(Path(cfg.data.root), cfg.data.train_split, work / "data-tags-only")
    common = ["--config", args.config] + [a for item in args.overrides for a in ("--set", item)]
    original_args = common + ["--run-dir", str(work / "original")]
    copy_args = common + ["--set", f"data.root={work / 'data-tags-only'}", "--set", "data.tags=tags.csv",
                          "--run-dir", str(work / "tags-only")]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True)
    summary = {"config": args.config, "overrides": args.overrides, "train_masks_removed": removed,
               "commit": commit.stdout.strip()}
    for name, run_args in (("original", original_args), ("tags_only", copy_args)):
        seconds, out = pipeline(run_args)
        summary[f"{name}_wall_s"] = round(seconds, 1)
        summary[f"{name}_table"] = out.strip().splitlines()[-4:]
        summary[f"{name}_data_check"] = re.search(r"data: .*", out).group(0)
    seconds, out = pipeline(original_args)  # every stage cached: what remains is the data check
    summary["rerun_wall_s"] = round(seconds, 1)
    summary["rerun_data_check"] = re.search(r"data: .*", out).group(0)
    for folder, pattern in FOLDERS.items():
        files = sorted((work / "original" / folder).glob(pattern))
        differing = [f.name for f in files if not same(f, work / "tags-only" / folder / f.name)]
        summary[folder] = {"files": len(files), "identical": len(files) - len(differing),
                           "differing": differing[:5]}
    (work / "identity.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if all(summary[f]["files"] and not summary[f]["differing"] for f in FOLDERS) else 1


if __name__ == "__main__":
    sys.exit(main())
