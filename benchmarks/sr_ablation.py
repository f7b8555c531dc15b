#!/usr/bin/env python
"""Self-Regulation ablation: baseline / SR in cam / SR in seg / SR in both, and full mode SR off/on.

Runs the pipeline's own CLI once per (variant, seed), sharing upstream work through the
stage cache: the variants that differ only in seg copy the finished cam and refine
folders of the variant they share them with, so each cam and each refine runs once per
seed. Each finished seg network is also scored on the train split's masks
(tools/score_seg_on_train.py, into ``<run>/seg_train_score.json``): the score to choose
by, val being only reported. Prints CAM / pseudo-mask / seg train / seg val mIoU as mean ±
spread (half the max-min range) over the seeds, and the per-class val IoU of the named classes.

Produced the tables of docs/results.md, section "Self-Regulation on the demo: baseline, SR in
cam, SR in seg, SR in both (3 seeds)".

    .venv/bin/python benchmarks/sr_ablation.py --seeds 0 1 2 [--config configs/demo.yaml] \\
        [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# variant: (mode, cam SR, seg SR, variant whose cam/refine it reuses)
VARIANTS = {
    "baseline": ("weak", False, False, None),
    "sr-cam": ("weak", True, False, None),
    "sr-seg": ("weak", False, True, "baseline"),
    "sr-both": ("weak", True, True, "sr-cam"),
    "full": ("full", False, False, None),
    "full-sr": ("full", False, True, None),
}
TRAIN_SCORE = "seg_train_score.json"  # in each run folder: its seg network scored on the train split


def run_variant(args, name: str, seed: int) -> Path:
    mode, cam_sr, seg_sr, shares = VARIANTS[name]
    run_dir = args.out / f"{name}-seed{seed}"
    if shares is not None:
        copy_stages(args.out / f"{shares}-seed{seed}", run_dir, ("cam", "refine"))
    settings = ["--config", args.config, "--mode", mode, "--run-dir", str(run_dir), "--set", f"seed={seed}",
                "--set", f"cam.sr.enabled={str(cam_sr).lower()}",
                "--set", f"seg.sr.enabled={str(seg_sr).lower()}"]
    run_and_score(settings + [arg for item in args.overrides for arg in ("--set", item)], run_dir)
    return run_dir


def copy_stages(source_run: Path, run_dir: Path, stages: tuple[str, ...]) -> None:
    """Copies finished stage folders of ``source_run`` into ``run_dir`` (those not already there)."""
    for stage in stages:
        source, target = source_run / stage, run_dir / stage
        if not (source / "manifest.json").exists():
            sys.exit(f"error: {run_dir} reuses {source}, which does not exist: run that first")
        if not (target / "manifest.json").exists():
            # Copy under a temporary name, then rename: a killed copy is never taken as cached.
            partial = run_dir / f".{stage}.copy"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(source, partial)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)


def run_and_score(settings: list[str], run_dir: Path, stages: str | None = None, score: bool = True) -> None:
    """Runs ``stages`` (default: all of the mode) with the pipeline CLI's ``settings``
    (``--run-dir run_dir`` among them), progress and errors appended to ``<run_dir>.log``;
    with ``score``, then scores the run's seg network on the train split."""
    command = ([sys.executable, str(ROOT / "run_pipeline.py")] + (["--stages", stages] if stages else [])
               + settings)
    print(" ".join(command), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_suffix(".log"), "a") as log:
        subprocess.run(command, check=True, cwd=ROOT, stderr=log)
        if score:
            train_score = [sys.executable, str(ROOT / "tools" / "score_seg_on_train.py"), *settings,
                           "--json", str(run_dir / TRAIN_SCORE)]
            subprocess.run(train_score, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)


def read_metrics(run_dir: Path, stage: str) -> dict | None:
    path = run_dir / TRAIN_SCORE if stage == "seg train" else run_dir / stage / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    return metrics["predictions"] if stage == "seg train" else metrics


def mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{100 * mean:.1f} ± {100 * (max(values) - min(values)) / 2:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="runs/sr-ablation")
    parser.add_argument("--classes", nargs="+",
                        default=["ball", "lamp", "table", "plate", "tile", "bus", "house"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--report-only", action="store_true",
                        help="print the table of finished runs, run nothing")
    args = parser.parse_args()
    args.out = ROOT / args.out  # the CLI runs from the repository root, so relative paths mean the same there

    # Shared upstreams first, so the variants that reuse them find them.
    order = sorted(args.variants, key=lambda name: VARIANTS[name][3] is not None)
    for seed in [] if args.report_only else args.seeds:
        for name in order:
            run_variant(args, name, seed)

    print(f"\nseeds {args.seeds}; mIoU % mean ± spread")
    print(f"{'variant':<10}{'CAM':>14}{'pseudo':>14}{'seg train':>14}{'seg val':>14}  "
          + "  ".join(f"{c:>11}" for c in args.classes))
    for name in args.variants:
        runs = [args.out / f"{name}-seed{seed}" for seed in args.seeds]
        row = []
        for stage in ("cam", "refine", "seg train", "seg"):
            row.append(mean_spread([m["miou"] for r in runs if (m := read_metrics(r, stage))]))
        seg_metrics = [m for r in runs if (m := read_metrics(r, "seg"))]
        per_class = [mean_spread([m["per_class_iou"][c] or 0.0 for m in seg_metrics]) for c in args.classes]
        print(f"{name:<10}" + "".join(f"{v:>14}" for v in row) + "  "
              + "  ".join(f"{v:>11}" for v in per_class))


if __name__ == "__main__":
    main()
