#!/usr/bin/env python
"""Rerun the demo's headline table and compare it with the recorded one (docs/demo_reference.json).

Runs the demo config (seed 0) in weak mode (cam -> refine -> seg) and in full mode (seg)
into fresh run folders, then compares each mIoU with the record:

* same library versions (torch, torchvision, numpy, scipy, pillow, pydensecrf2), thread count,
  device and CPU model as the record (the keys the record holds): the numbers must be
  identical (to the 6 decimals recorded); a seeded CPU run repeats bit for bit there;
* anything else differs: within TOLERANCE mIoU points, and the differing versions are named
  (float summation order changes with the kernels, so trained networks drift apart).

About 10 minutes on a 2-core CPU. ``--record`` writes the reference from this run instead.

Produced the table of docs/results.md, section "Demo: the headline rows" (and the record the
section "One process against two gloo processes (demo)" compares with).

    .venv/bin/python benchmarks/reproduce_demo.py                   # compare
    .venv/bin/python benchmarks/reproduce_demo.py --record          # after a deliberate change
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "demo_reference.json"
PACKAGES = ("torch", "torchvision", "numpy", "scipy", "pillow", "pydensecrf2")
TOLERANCE = 2.0  # mIoU points, across library versions or thread counts
RUNS = {  # name -> (extra arguments, the metrics.json that holds its mIoU)
    "cam": ([], "cam"), "pseudo masks": ([], "refine"), "seg weak": ([], "seg"),
    "seg full": (["--mode", "full", "--stages", "seg"], "seg"),
}


def environment(num_threads: int) -> dict:
    """What a bit-identical rerun needs to share with the record. The CPU model counts too:
    torch picks its kernels by instruction set, and they sum floats in different orders."""
    return {"python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_model(),
            "device": "cpu", "num_threads": num_threads} | {name: metadata.version(name) for name in PACKAGES}


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def run(run_dir: Path, extra: list[str]) -> float:
    command = [sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
               "--set", "device=cpu", "--run-dir", str(run_dir)] + extra
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "reproduce-demo"),
                        help="parent of the two fresh run folders (default: %(default)s)")
    parser.add_argument("--record", action="store_true", help="write docs/demo_reference.json from this run")
    args = parser.parse_args()
    from pipeline.core.config_file import load_config

    num_threads = load_config(ROOT / "configs" / "demo.yaml").num_threads
    base = Path(args.run_dir)
    shutil.rmtree(base, ignore_errors=True)
    seconds = {"weak": run(base / "weak", []), "full": run(base / "full", RUNS["seg full"][0])}
    measured = {}
    for name, (extra, stage) in RUNS.items():
        folder = base / ("full" if extra else "weak") / stage
        measured[name] = round(json.loads((folder / "metrics.json").read_text())["miou"], 6)
    env = environment(num_threads)
    if args.record:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True)
        REFERENCE.write_text(json.dumps({
            "environment": env, "seed": 0, "miou": measured,
            "wall_seconds": {k: round(v) for k, v in seconds.items()},
            "commit": commit.stdout.strip(),
            "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }, indent=2) + "\n")
        print(f"recorded {REFERENCE}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in measured.items()))
        return 0
    if not REFERENCE.is_file():
        print(f"no record at {REFERENCE}: make one with --record")
        return 1
    reference = json.loads(REFERENCE.read_text())
    differing = {k: (v, env.get(k)) for k, v in reference["environment"].items() if env.get(k) != v}
    exact = not differing
    changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differing.items())
    print(f"environment: {'same as recorded' if exact else 'differs from the record: ' + changes}")
    print(f"rule: {'identical' if exact else f'within {TOLERANCE} mIoU points'}; "
          f"wall time weak {seconds['weak']:.0f} s, full {seconds['full']:.0f} s")
    print(f"{'':<14}{'recorded':>10}{'now':>10}{'diff':>8}")
    ok = True
    for name, value in measured.items():
        recorded = reference["miou"][name]
        diff = 100 * (value - recorded)
        passed = value == recorded if exact else abs(diff) <= TOLERANCE
        ok &= passed
        verdict = "ok" if passed else "DIFFERS"
        print(f"{name:<14}{100 * recorded:>10.2f}{100 * value:>10.2f}{diff:>+8.2f}  {verdict}")
    print("reproduced" if ok else "NOT reproduced")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
