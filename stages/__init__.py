"""The stage registry and the planner that decides, per stage, run or reuse the cache.

Each stage module has ``upstream(cfg)`` (the stages whose outputs it reads),
``own_inputs(cfg)`` (its cache version, the config values and data fingerprint it depends
on, and under ``scoring`` what only changes its scores) and the entry point
``run(cfg, run_dir) -> metrics``. :data:`RUN_FOLDERS` is every cached folder a run folder
can hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.cache import METRICS, read_json, stage_status, training_key
from pipeline.core.config import Config
from pipeline.core.errors import CacheError, ConfigError
from pipeline.refinement import NETWORK_FOLDERS
from stages import cam, refine, seg

STAGES = {"cam": cam, "refine": refine, "seg": seg}
# Every cached folder a run folder can hold, in pipeline order: the stages' and the folders
# of the networks refine's methods train.
RUN_FOLDERS = ("cam", *NETWORK_FOLDERS, "refine", "seg")


def mode_stages(cfg: Config) -> list[str]:
    """The stages a mode runs: seg and everything upstream of it."""
    needed, queue = [], ["seg"]
    while queue:
        name = queue.pop()
        needed.append(name)
        queue.extend(STAGES[name].upstream(cfg))
    return [name for name in STAGES if name in needed]


def expected_inputs(cfg: Config, stage: str) -> dict:
    """What the stage's manifest must record for its cache to be valid under ``cfg``."""
    module = STAGES[stage]
    return module.own_inputs(cfg) | {
        "upstream": {name: training_key(expected_inputs(cfg, name)) for name in module.upstream(cfg)}}


@dataclass
class PlannedStage:
    name: str
    state: str  # cached, stale or missing
    reason: str
    will_run: bool
    forced: bool = False  # --force: computes everything again, reusing nothing of a finished folder


def parse_stages(text: str | None, cfg: Config) -> list[str]:
    if text is None:
        return mode_stages(cfg)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise ConfigError(f"--stages: unknown stage {unknown[0] if unknown else text!r}; "
                          f"stages: {', '.join(STAGES)}")
    unused = [name for name in names if name not in mode_stages(cfg)]
    if unused:
        raise ConfigError(f"--stages: {', '.join(unused)} not used in --mode {cfg.mode} "
                          f"(its stages: {', '.join(mode_stages(cfg))})")
    return [name for name in STAGES if name in names]  # pipeline order, whatever order was typed


def plan(cfg: Config, run_dir: Path, requested: list[str], force: bool) -> list[PlannedStage]:
    """Status of each requested stage; raises CacheError before any work if an upstream
    output that a stage to run needs is missing or stale and is not going to be made."""
    planned = []
    for name in requested:
        status = stage_status(run_dir, name, expected_inputs(cfg, name))
        planned.append(PlannedStage(name, status.state, status.reason, force or status.state != "cached",
                                    forced=force))
    for stage in (p for p in planned if p.will_run):
        for needed in STAGES[stage.name].upstream(cfg):
            if needed in requested:
                continue
            status = stage_status(run_dir, needed, expected_inputs(cfg, needed))
            if status.state != "cached":
                raise CacheError(f"stage {stage.name} needs the output of stage {needed}, "
                                 f"which is {status.state} ({status.reason}); "
                                 f"run it first: --stages {needed},{stage.name}")
    return planned


@dataclass
class StageResult:
    name: str
    miou: float | None  # None: not scored (the reason in not_scored)
    wall_time_s: float
    ran: bool
    not_scored: str | None = None
    teacher_miou: float | None = None  # seg in mixed mode: the teacher branch's score beside the student's


def execute(cfg: Config, run_dir: Path, planned: list[PlannedStage]) -> list[StageResult]:
    results = []
    for stage in planned:
        if stage.will_run:
            metrics = STAGES[stage.name].run(cfg, run_dir, force=stage.forced)
        else:
            metrics = read_json(run_dir / stage.name / METRICS) or {}
        results.append(StageResult(stage.name, metrics.get("miou", float("nan")),
                                   metrics.get("wall_time_s", float("nan")), stage.will_run,
                                   metrics.get("not_scored"), (metrics.get("teacher") or {}).get("miou")))
    return results
