#!/usr/bin/env python
"""The GPU check: the demo's stages (cam, refine, seg; weak mode) on CUDA with mixed precision,
timed per stage, written to a JSON file and a Markdown section ready for docs/results.md.

    python tools/gpu_check.py                      # a machine with a GPU, as it is: runs/gpu-check/
    python tools/gpu_check.py --also-cpu           # and the same run on the CPU, for the speed ratio
    python tools/gpu_check.py --device cpu --tiny  # the test's: the demo at tiny size on the CPU (~1 min)

Each stage runs as its own ``run_pipeline.main`` call (``--stages NAME``) in one fresh run folder
under --out, so that the peak GPU memory is reset per stage. Per stage: the wall time (the stage's
``metrics.json`` ``wall_time_s``), images per second (for cam and seg the training's: images x epochs
/ training seconds, timed around the stage's ``train`` call; for refine the pseudo masks made / the
stage's wall time), the images per second of the rest of the stage (CAM inference, prediction and
scoring), peak GPU memory (``torch.cuda.max_memory_allocated``) and the mIoU (CAMs and pseudo masks on
train, seg on val). Output: <out>/gpu_check.json and <out>/gpu_check.md (the latest check).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import run_pipeline
import stages.cam
import stages.seg
from pipeline.core.cache import METRICS
from pipeline.core.config_file import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.training import amp_dtype

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("cam", "refine", "seg")
TRAINED = {"cam": stages.cam, "seg": stages.seg}  # stages whose training is timed apart
INFERRED = {"cam": ("cams", "*.npz"), "refine": ("pseudo", "*.png"), "seg": ("predictions", "*.png")}
SCORED_ON = {"cam": "train", "refine": "train", "seg": "val"}
# The demo at test size: a minute on 2 CPU cores for the three stages.
TINY = [
    "demo.num_train=16", "demo.num_val=8", "demo.min_size=48", "demo.max_size=64",
    "cam.train.epochs=1", "cam.train.batch_size=4", "cam.train.crop_size=48", "cam.scales=[1.0]",
    "seg.train.epochs=1", "seg.train.batch_size=4", "seg.train.crop_size=48",
]
NO_CUDA = "error: no CUDA device (torch.cuda.is_available() is False)"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="default: %(default)s")
    parser.add_argument("--also-cpu", action="store_true",
                        help="with --device cuda: run the same on the CPU afterwards, for the speed ratio")
    parser.add_argument("--tiny", action="store_true", help="the demo at tiny size (the test's)")
    parser.add_argument("--out", default="runs/gpu-check", help="output folder (default: %(default)s)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="default: the demo's")
    parser.add_argument("--data-root", help="the demo data's folder (default: <out>/data/demo, or demo-tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="one more config override for every run, as run_pipeline.py's --set; repeatable")
    return parser.parse_args(argv)


def overrides(args, device: str) -> list[str]:
    """The --set items of every stage call on ``device``: device, AMP, data folder, tiny size."""
    data_root = args.data_root or str(Path(args.out) / "data" / ("demo-tiny" if args.tiny else "demo"))
    items = [f"device={device}", "cam.train.amp=auto", "seg.train.amp=auto", f"data.root={data_root}"]
    return items + (TINY if args.tiny else []) + list(args.overrides)


@contextlib.contextmanager
def timed_training(records: dict):
    """Times the ``train`` call of cam and seg (CUDA synchronised) into ``records[stage]``:
    seconds, steps and images (steps x the global batch: full batches only)."""
    originals = {name: module.train for name, module in TRAINED.items() if hasattr(module, "train")}

    def wrap(name, original):
        def timed(model, loader, compute_loss, cfg, device, *rest, **kwargs):
            synchronize(device)
            started = time.perf_counter()
            history = original(model, loader, compute_loss, cfg, device, *rest, **kwargs)
            synchronize(device)
            steps = len(history) * len(loader)
            records[name] = {"seconds": time.perf_counter() - started, "epochs": len(history), "steps": steps,
                             "images": steps * cfg.batch_size}
            return history
        return timed

    for name, original in originals.items():
        TRAINED[name].train = wrap(name, original)
    try:
        yield
    finally:
        for name, original in originals.items():
            TRAINED[name].train = original


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def dtype_name(dtype: torch.dtype | None) -> str:
    return "off (float32)" if dtype is None else str(dtype).replace("torch.", "")


def fresh_run_dir(out: Path, device: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, n = out / "runs" / f"{stamp}-{device}", 1
    while run_dir.exists():
        n += 1
        run_dir = out / "runs" / f"{stamp}-{device}-{n}"
    return run_dir


def stage_record(stage: str, run_dir: Path, training: dict | None, peak: dict, call_s: float) -> dict:
    """One stage's row: its metrics.json, the training's timing (cam, seg) and the memory peak."""
    metrics = json.loads((run_dir / stage / METRICS).read_text())
    wall = metrics["wall_time_s"]
    folder, pattern = INFERRED[stage]
    inferred = len(list((run_dir / stage / folder).glob(pattern)))
    record = {"wall_s": wall, "call_s": round(call_s, 2), "miou": metrics.get("miou"),
              "scored_on": SCORED_ON[stage], "inferred_images": inferred} | peak
    if training is not None:
        rest = wall - training["seconds"]
        record |= {"train_s": round(training["seconds"], 2), "epochs": training["epochs"],
                   "train_steps": training["steps"], "train_images": training["images"],
                   "images_per_s": training["images"] / training["seconds"],
                   "images_per_s_basis": "training: images x epochs / training seconds",
                   "inference_images_per_s": inferred / rest if rest > 0 else None}
    elif stage in TRAINED:  # the training could not be timed apart (stages.<name>.train not found)
        epochs = len(metrics.get("train_loss_by_epoch") or [])
        train_ids = len(list((run_dir / "cam" / "cams").glob("*.npz")))  # a CAM per train image
        record |= {"images_per_s": (train_ids * epochs + inferred) / wall,
                   "images_per_s_basis": "(train images x epochs + images inferred) / stage wall time"}
    else:
        record |= {"images_per_s": inferred / wall,
                   "images_per_s_basis": "pseudo masks made / stage wall time"}
    return record


def run_device(args, device: str) -> dict:
    """The three stages on ``device``, one ``run_pipeline.main`` call each, in a fresh run folder."""
    sets = overrides(args, device)
    cfg = load_config(args.config, sets, "weak")  # a bad override fails here, before any work
    run_dir = fresh_run_dir(Path(args.out), device)
    cuda = device == "cuda"
    result = {"device": device, "run_dir": str(run_dir), "overrides": sets,
              "amp": {"setting": {"cam": cfg.cam.train.amp, "seg": cfg.seg.train.amp},
                      "dtype": dtype_name(amp_dtype(cfg.cam.train.amp, torch.device(device)))},
              "num_threads": cfg.num_threads, "stages": {}}
    if cuda:  # the CUDA context is made before the first stage: not part of cam's time
        started = time.perf_counter()
        torch.ones(1, device="cuda").sum().item()
        result["cuda_init_s"] = round(time.perf_counter() - started, 2)
    argv = ["--config", args.config, "--mode", "weak", "--run-dir", str(run_dir)]
    for item in sets:
        argv += ["--set", item]
    total = time.perf_counter()
    for stage in STAGES:
        training: dict = {}
        if cuda:
            synchronize(device)
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with timed_training(training):
            code = run_pipeline.main(argv + ["--stages", stage])
        call_s = time.perf_counter() - started
        if code != 0:
            raise PipelineError(f"run_pipeline.py --stages {stage} on {device} exited with {code} "
                                "(see above)")
        peak = {"peak_gpu_memory_mib": None, "peak_gpu_memory_reserved_mib": None}
        if cuda:
            synchronize(device)
            peak = {"peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                    "peak_gpu_memory_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1)}
        result["stages"][stage] = stage_record(stage, run_dir, training.get(stage), peak, call_s)
    result["total_s"] = round(time.perf_counter() - total, 2)
    return result


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(cuda: bool) -> dict:
    info = {"host": platform.node(), "platform": platform.platform(), "cpu": cpu_model(),
            "cpu_cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "gpu": None, "gpu_memory_gib": None}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "gpu_count": torch.cuda.device_count()}
    return info


def fmt(value, spec: str = ".1f", scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def markdown(report: dict) -> str:
    m = report["machine"]
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB)" if m["gpu"] else "no GPU used"
    where = m["gpu"] or f"the CPU ({m['cpu']})"
    lines = [f"## GPU check: the demo's stages{' (tiny)' if report['tiny'] else ''} on {where}", "",
             "```bash", report["command"], "```", "",
             f"Commit {report['commit'] or 'unknown'}, {report['date']}. Machine: {gpu}; CPU {m['cpu']}, "
             f"{m['cpu_cores']} cores; Python {m['python']}, torch {m['torch']}, CUDA {m['cuda'] or 'n/a'}, "
             f"cuDNN {m['cudnn'] or 'n/a'}; weak mode, seed from the config."]
    for run in report["runs"]:
        amp = run["amp"]
        lines.append(f"On {run['device']}: AMP {amp['setting']['cam']} (cam) / {amp['setting']['seg']} (seg) "
                     f"-> {amp['dtype']}; num_threads {run['num_threads']}; the three stage calls "
                     f"{run['total_s']:.1f} s"
                     + (f" after {run['cuda_init_s']:.1f} s of CUDA start" if "cuda_init_s" in run else "")
                     + f"; run folder `{run['run_dir']}`.")
    lines += ["", "Images/s: cam and seg, the training's (images x epochs / training seconds); refine, the "
              "pseudo masks made / its wall time. \"Rest\": the images of the stage's inference (CAMs, seg "
              "prediction with scoring) / the stage's time outside training. mIoU: CAMs and pseudo masks on "
              "train, seg on val.", "",
              "| device | stage | wall time (s) | images/s | images/s, rest | training (s) "
              "| peak GPU memory (MiB) | mIoU (%) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in report["runs"]:
        for stage, r in run["stages"].items():
            basis = "" if r["images_per_s_basis"].startswith(("training", "pseudo")) else " (whole stage)"
            lines.append(f"| {run['device']} | {stage} ({r['scored_on']}) | {r['wall_s']:.1f} | "
                         f"{r['images_per_s']:.1f}{basis} | {fmt(r.get('inference_images_per_s'))} | "
                         f"{fmt(r.get('train_s'))} | {fmt(r['peak_gpu_memory_mib'], '.0f')} | "
                         f"{fmt(r['miou'], '.2f', 100)} |")
    if report.get("speedup"):
        lines += ["", "| stage | wall time, CPU / GPU | images/s, GPU / CPU |", "| --- | --- | --- |"]
        for stage, s in report["speedup"].items():
            lines.append(f"| {stage} | {fmt(s['wall_time'])}x | {fmt(s['images_per_s'])}x |")
    return "\n".join(lines) + "\n"


def speedup(runs: list[dict]) -> dict | None:
    by_device = {run["device"]: run["stages"] for run in runs}
    if set(by_device) != {"cuda", "cpu"}:
        return None
    gpu, cpu = by_device["cuda"], by_device["cpu"]
    return {stage: {"wall_time": cpu[stage]["wall_s"] / gpu[stage]["wall_s"],
                    "images_per_s": gpu[stage]["images_per_s"] / cpu[stage]["images_per_s"]}
            for stage in STAGES}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    out = Path(args.out)
    devices = [args.device] + (["cpu"] if args.also_cpu and args.device == "cuda" else [])
    report = {"command": "python tools/gpu_check.py" + (" " + shlex.join(argv) if argv else ""),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "commit": git_commit(), "tiny": args.tiny, "config": args.config,
              "machine": machine(args.device == "cuda"), "runs": []}
    try:
        for device in devices:
            report["runs"].append(run_device(args, device))
    except PipelineError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    report["speedup"] = speedup(report["runs"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print("\n" + table)
    print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
