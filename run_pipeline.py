#!/usr/bin/env python
"""Weakly supervised semantic segmentation, stage by stage: cam -> refine -> seg.

    python run_pipeline.py                                  # demo config, all stages, weak mode
    python run_pipeline.py --stages refine                  # rerun one stage from the cache
    python run_pipeline.py --mode full --stages seg         # fully supervised upper bound
    python run_pipeline.py --mode mixed                     # a few full masks + weak labels
    python run_pipeline.py --set seed=1 --set seg.train.epochs=2 --dry-run
    python run_pipeline.py predict --run-dir RUN --images DIR --out OUT   # segment new images
    python run_pipeline.py report --run-dir RUN                           # rebuild RUN/report.html
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

from pipeline.commands import predict, report
from pipeline.core.cache import RunLock
from pipeline.core.config import MODES
from pipeline.core.config_file import load_config
from pipeline.core.errors import CacheError, PipelineError
from pipeline.core.runtime import (
    configure_threads,
    destroy_process_group,
    distributed,
    from_main_process,
    init_distributed,
    is_main_process,
    keep_freed_memory,
    select_device,
)
from pipeline.data.checks import FileChecks
from pipeline.data.prepare import prepare_data
from stages import STAGES, execute, expected_inputs, parse_stages, plan, refine
from stages.seg import check_training_masks

CHECKED_FILES = "checked_files.json"  # in the run folder: what data validation found per file
COMMANDS = {"predict": predict.main, "report": report.main}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} "
                        "(default: all of the mode)")
    parser.add_argument("--mode", choices=MODES, help="weak: image labels only; full: ground-truth masks; "
                        "mixed: a few full masks plus weak labels (default: the config's mode, weak)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (YAML-parsed), e.g. --set seg.train.epochs=2; "
                        "repeatable")
    parser.add_argument("--run-dir", help="where stage outputs go (default: runs/<config stem>-<mode>)")
    parser.add_argument("--force", action="store_true", help="recompute the listed stages even if cached")
    parser.add_argument("--dry-run", action="store_true", help="print what each stage would do, then exit")
    return parser.parse_args(argv)


def write_report(run_dir: Path) -> Path | None:
    """The run report; a failure there is a warning: the stages' results are safe in the cache."""
    try:
        return report.write_report(run_dir)
    except Exception as error:  # noqa: BLE001 - whatever breaks the page must not hide the results table
        print("warning: report.html not written "
              f"({type(error).__name__}: {' '.join(str(error).split())[:300]}); "
              f"retry with: python run_pipeline.py report --run-dir {run_dir}", file=sys.stderr)
        return None


def describe_refine_network(cfg, run_dir: Path, refine_runs: bool) -> None:
    """The dry run's line for refine's own cached network (methods affinity and irn): a refine
    that runs reuses it when it is cached, even under --force, and trains it otherwise."""
    found = refine.network_status(cfg, run_dir, expected_inputs(cfg, "refine"))
    if found is not None:
        folder, status = found
        action = ("reuse" if status.state == "cached" else "train") if refine_runs else "skip"
        print(f"  {folder:<12} {status.state:<8} -> {action}: {status.reason}")


def prepare(args, cfg, run_dir: Path):
    """Everything before the run folder is written: the data set checked (and the demo
    generated), the masks seg trains on, the plan. Raises PipelineError on bad input."""
    requested = parse_stages(args.stages, cfg)
    checks = FileChecks(run_dir / CHECKED_FILES)
    dataset = prepare_data(cfg, checks)
    if "seg" in requested:
        check_training_masks(cfg, dataset)
    return checks, plan(cfg, run_dir, requested, args.force)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, args.mode)
        run_dir = Path(args.run_dir or f"runs/{Path(args.config).stem}-{cfg.mode}")
        # Under torchrun the main process checks and plans first (the others would race it
        # generating the demo data), then the others, on what it left.
        init_distributed(select_device(cfg.device))
        error = None
        if is_main_process():
            try:
                checks, planned = prepare(args, cfg, run_dir)
            except PipelineError as failed:
                error = str(failed)
        error = from_main_process(error)
        if error is not None:
            raise PipelineError(error)
        if not is_main_process():
            checks, planned = prepare(args, cfg, run_dir)
        if args.dry_run:
            for stage in planned if is_main_process() else []:
                action = "run" if stage.will_run else "skip"
                forced = " (--force)" if args.force and stage.state == "cached" else ""
                print(f"{stage.name:<7} {stage.state:<8} -> {action}{forced}: {stage.reason}")
                if stage.name == "refine":
                    describe_refine_network(cfg, run_dir, stage.will_run)
            return 0
        with run_folder_lock(run_dir):  # every check passed: the run folder may be written from here on
            if is_main_process():
                checks.save()
                print(checks.summary())
            configure_threads(cfg.num_threads)
            keep_freed_memory()
            results = execute(cfg, run_dir, planned)
            page = write_report(run_dir) if is_main_process() else None
    except PipelineError as error:
        if is_main_process():
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if distributed():
            destroy_process_group()
    if not is_main_process():
        return 0
    print(f"\nrun folder: {run_dir}   mode: {cfg.mode}   "
          f"report: {page or 'not written (see the warning above)'}")
    print(f"{'stage':<8}{'mIoU':>8}{'time (s)':>11}  status")
    for result in results:
        miou = "-" if result.miou is None or math.isnan(result.miou) else f"{100 * result.miou:.1f}"
        status = (("ran" if result.ran else "cached")
                  + (f", not scored ({result.not_scored})" if result.not_scored else ""))
        if result.teacher_miou is not None:  # mixed mode: the mIoU column is the student's
            status += f"; teacher branch {100 * result.teacher_miou:.1f}"
        print(f"{result.name:<8}{miou:>8}{result.wall_time_s:>11.1f}  {status}")
    return 0


@contextlib.contextmanager
def run_folder_lock(run_dir: Path):
    """The run folder's lock, held by the main process for all; under torchrun the others
    learn whether it got it."""
    lock = RunLock(run_dir)
    error = None
    if is_main_process():
        try:
            lock.__enter__()
        except PipelineError as failed:
            error = str(failed)
    error = from_main_process(error)
    if error is not None:
        raise CacheError(error)
    try:
        yield
    finally:
        if is_main_process():
            lock.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())
