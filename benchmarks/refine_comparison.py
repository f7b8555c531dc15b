#!/usr/bin/env python
"""Refinement comparison: CAM -> CRF masks / PSA's AffinityNet walk / IRNet's boundary walk -> seg.

Per seed: one cam run (``<out>/cam-seed<S>``), its folder copied into one run per refine
method (``<out>/<method>-seed<S>``), each running refine and seg on it; with ``--full`` also
the fully supervised bound (``<out>/full-seed<S>``, seg only, the same seg settings). Every
seg network is scored on the train split too (tools/score_seg_on_train.py): the score to
choose by, val being only reported. Finished runs are reused (the stage cache), so a killed
comparison resumes where it stopped.

Prints per method, mean ± spread (half the max-min range) over the seeds: the CAMs' mIoU,
the pseudo masks' mIoU (unsure counted as background: the PSA/IRNet argmax protocol) and
their gain over the CAMs, the confident pixels' mIoU and the unsure share, the same two for
the labels the relation network learnt from, its training steps and seconds, the refine
pass's seconds per image, seg train and val mIoU, and weak/full (val) when ``--full`` ran.

Produced the tables of docs/results.md, sections "The demo, 3 seeds: CAM -> CRF / PSA walk /
IRNet walk -> seg" and "Weak against full with SR in seg, as msrc.yaml ships". Imports
sr_ablation.py from its own folder (a script's folder is the first on Python's path).

    .venv/bin/python benchmarks/refine_comparison.py --seeds 0 1 2 [--config configs/demo.yaml] \\
        [--methods crf affinity irn] [--full] [--set KEY=VALUE ...] [--report-only]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sr_ablation import ROOT, copy_stages, mean_spread, read_metrics, run_and_score

METHODS = ("crf", "affinity", "irn")


def run_seed(args, seed: int) -> None:
    common = ["--config", args.config, "--set", f"seed={seed}"]
    common += [a for item in args.overrides for a in ("--set", item)]
    cam_run = args.out / f"cam-seed{seed}"
    run_and_score(common + ["--run-dir", str(cam_run)], cam_run, stages="cam", score=False)
    for method in args.methods:
        run_dir = args.out / f"{method}-seed{seed}"
        copy_stages(cam_run, run_dir, ("cam",))
        run_and_score(common + ["--set", f"refine.method={method}", "--run-dir", str(run_dir)], run_dir,
                      stages="refine,seg")
    if args.full:
        run_dir = args.out / f"full-seed{seed}"
        run_and_score(common + ["--mode", "full", "--run-dir", str(run_dir)], run_dir, stages="seg")


def report(args) -> None:
    def column(runs: list[Path], stage: str, *keys: str) -> list[float]:
        """The value at ``keys`` (nested) of each run's metrics, where it has one."""
        values = []
        for metrics in filter(None, (read_metrics(r, stage) for r in runs)):
            for key in keys:
                metrics = metrics.get(key) if isinstance(metrics, dict) else None
            if metrics is not None:
                values.append(metrics)
        return values

    def plain(values: list[float], digits: int, factor: float = 1.0) -> str:
        if not values:
            return "-"
        mean = factor * sum(values) / len(values)
        return f"{mean:.{digits}f} ± {factor * (max(values) - min(values)) / 2:.{digits}f}"

    full = [m["miou"] for seed in args.seeds if (m := read_metrics(args.out / f"full-seed{seed}", "seg"))]
    print(f"\nseeds {args.seeds}; mIoU % mean ± spread"
          + (f"; full (val) {mean_spread(full)}" if full else ""))
    header = ("method", "CAM", "pseudo", "gain", "confident", "unsure %", "labels: confident",
              "labels: unsure %", "net steps", "net s", "s/image", "seg train", "seg val", "weak/full")
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for method in args.methods:
        runs = [args.out / f"{method}-seed{seed}" for seed in args.seeds]
        seg_val = column(runs, "seg", "miou")
        ratios = [w / f for w, f in zip(seg_val, full)] if len(full) == len(seg_val) else []
        row = [method, mean_spread(column(runs, "refine", "cam_miou")),
               mean_spread(column(runs, "refine", "miou")),
               mean_spread(column(runs, "refine", "gain_over_cam")),
               mean_spread(column(runs, "refine", "confident_miou")),
               plain(column(runs, "refine", "unsure_fraction"), 1, factor=100.0),
               mean_spread(column(runs, "refine", "crf", "confident_miou")),
               plain(column(runs, "refine", "crf", "unsure_fraction"), 1, factor=100.0),
               plain(column(runs, "refine", "net_train_steps"), 0),
               plain(column(runs, "refine", "net_train_seconds"), 0),
               plain(column(runs, "refine", "seconds_per_image"), 3),
               mean_spread(column(runs, "seg train", "miou")), mean_spread(seg_val), plain(ratios, 2)]
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--full", action="store_true", help="also the fully supervised bound, for weak/full")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="runs/refine-comparison")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--report-only", action="store_true",
                        help="print the table of finished runs, run nothing")
    args = parser.parse_args()
    args.out = ROOT / args.out
    for seed in [] if args.report_only else args.seeds:
        run_seed(args, seed)
    report(args)


if __name__ == "__main__":
    main()
