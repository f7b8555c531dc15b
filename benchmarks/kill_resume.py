#!/usr/bin/env python
"""kill -9 in the middle of each phase of a stage, rerun the same command, and measure what
was lost and whether the outputs equal an uninterrupted run's.

First every stage runs once, alone and uninterrupted (timed): the reference. Then for each
phase the stage runs alone again (its upstream stages copied from the reference), killed
with SIGKILL when the phase is half done (judged from the stage's partial folder: the
end-of-epoch checkpoint written for half the reference's epochs, or half the per-image
outputs), then rerun with the same command (timed). Lost seconds = killed run +
rerun - uninterrupted run: the work done twice plus the restart. Every output file of the
rerun is compared byte for byte with the reference run's (``metrics.json`` and the
manifest excepted: they hold wall times).

    .venv/bin/python benchmarks/kill_resume.py --work runs/kill-resume [--set KEY=VALUE ...]

Writes ``<work>/kill_resume.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# phase -> (stage, extra arguments, the partial folder's marker, how many marker files mean "half done")
AFFINITY = ["--set", "refine.method=affinity"]
PHASES = {
    "cam training": ("cam", [], "checkpoint.pt", None),
    "CAM inference": ("cam", [], "cams/*.npz", 0.5),
    "CRF": ("refine", [], "pseudo/*.png", 0.5),
    "AffinityNet training": ("refine", AFFINITY, "checkpoint.pt", None),
    "random walk": ("refine", AFFINITY, "pseudo/*.png", 0.5),
    "seg training": ("seg", [], "checkpoint.pt", None),
    "seg prediction": ("seg", [], "predictions/*.png", 0.5),
}
UPSTREAM = {"cam": [], "refine": ["cam"], "seg": ["cam", "refine"]}
PARTIAL = {"cam": ".cam.partial", "refine": ".refine.partial", "seg": ".seg.partial"}


def command(args, run_dir: Path, stage: str, extra: list[str]) -> list[str]:
    argv = [sys.executable, str(ROOT / "run_pipeline.py"), "--config", args.config, "--run-dir", str(run_dir),
            "--stages", stage] + extra
    for item in args.overrides:
        argv += ["--set", item]
    return argv


def partial_folder(run_dir: Path, stage: str, extra: list[str]) -> Path:
    # The AffinityNet trains in its own partial folder before refine's.
    if extra == AFFINITY and stage == "refine" and not (run_dir / "affinitynet").is_dir():
        return run_dir / ".affinitynet.partial"
    return run_dir / PARTIAL[stage]


def half_done(folder: Path, marker: str, share: float | None, total: int, checkpoints: set) -> bool:
    """Training (``share`` None): ``checkpoints`` collects the versions of the end-of-epoch
    checkpoint seen (rewritten atomically once per epoch), ``total`` is the epoch count."""
    if share is None:
        if (folder / marker).is_file():
            checkpoints.add((folder / marker).stat().st_mtime_ns)
        return len(checkpoints) >= max(1, total // 2)
    return len(list(folder.glob(marker))) >= share * total


def epochs_run(run: Path, stage: str, extra: list[str]) -> int:
    """How many epochs the stage's network (the AffinityNet's, for ``extra``) trained in ``run``."""
    folder = "affinitynet" if extra == AFFINITY and stage == "refine" else stage
    return len(json.loads((run / folder / "metrics.json").read_text())["train_loss_by_epoch"])


def prepared(reference: Path, run_dir: Path, stage: str) -> Path:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for upstream in UPSTREAM[stage]:
        shutil.copytree(reference / upstream, run_dir / upstream)
    return run_dir


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - started


def differing(reference: Path, run: Path, stage: str) -> list[str]:
    names = []
    for path in sorted((reference / stage).rglob("*")):
        if path.is_file() and path.name not in ("metrics.json", "manifest.json"):
            other = run / stage / path.relative_to(reference / stage)
            if not other.is_file() or other.read_bytes() != path.read_bytes():
                names.append(str(path.relative_to(reference)))
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--phases", nargs="*", default=list(PHASES))
    args = parser.parse_args()
    work = args.work.resolve()
    # Every stage once, uninterrupted and timed, stage by stage: the upstream outputs the phases
    # start from, and the run each phase is compared with (phases of one stage share it).
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    reference.mkdir(parents=True)
    uninterrupted_runs = {(stage, ()): (reference, timed(command(args, reference, stage, [])))
                          for stage in ("cam", "refine", "seg")}
    rows = {}
    for phase in args.phases:
        stage, extra, marker, share = PHASES[phase]
        name = phase.replace(" ", "-")
        if (stage, tuple(extra)) not in uninterrupted_runs:  # the AffinityNet's refine
            ref = prepared(reference, work / f"{name}-uninterrupted", stage)
            uninterrupted_runs[(stage, tuple(extra))] = (ref, timed(command(args, ref, stage, extra)))
        ref, uninterrupted = uninterrupted_runs[(stage, tuple(extra))]
        # The same command twice more: killed at half, then rerun after the kill.
        total = epochs_run(ref, stage, extra) if share is None else len(list((ref / stage).glob(marker)))
        checkpoints = set()
        killed = prepared(reference, work / name, stage)
        started = time.perf_counter()
        process = subprocess.Popen(command(args, killed, stage, extra), cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None and not half_done(partial_folder(killed, stage, extra), marker, share, total,
                                                             checkpoints):
            time.sleep(0.1)
        if process.poll() is not None:
            print(f"{phase}: the stage finished before it was half done; no kill", file=sys.stderr)
            continue
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        killed_after = time.perf_counter() - started
        rerun = timed(command(args, killed, stage, extra))
        rows[phase] = {"uninterrupted_s": round(uninterrupted, 1), "killed_after_s": round(killed_after, 1),
                       "rerun_s": round(rerun, 1), "lost_s": round(killed_after + rerun - uninterrupted, 1),
                       "differing_files": differing(ref, killed, stage)}
        print(f"{phase:<22} uninterrupted {uninterrupted:7.1f} s  killed after {killed_after:7.1f} s  "
              f"rerun {rerun:7.1f} s  lost {rows[phase]['lost_s']:6.1f} s  "
              f"differing files {len(rows[phase]['differing_files'])}", flush=True)
    (work / "kill_resume.json").write_text(json.dumps({"overrides": args.overrides, "phases": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
