"""The on-disk stage cache: manifests, cache keys and atomic stage folders.

A stage writes into ``<run-dir>/.<stage>.partial/`` and, when everything is there,
writes ``manifest.json`` last and renames the folder to ``<run-dir>/<stage>/``. A stage
killed half-way therefore leaves only its ``.partial`` folder, which is never read as a
result; the next run of that stage under the same key resumes from it, under another
key deletes it. The manifest's key is a hash of the
stage's inputs: the stage's cache version, the config values it depends on, a fingerprint
of the data it reads, and the training keys of its upstream stages, so a change anywhere
upstream makes every downstream output stale. What only changes how a stage is scored
(the masks it is scored against, seg's volumes and spacing, cam's scoring threshold) sits
apart, under the inputs' ``scoring`` entry: the *training key* leaves it out, and a stage
whose training key still matches its finished folder reuses that folder's network and
per-image outputs and only scores again (``StageOutput.reused``). The manifest also lists
every file with its size (model files with a content digest), so a file truncated or deleted
later makes the stage "damaged".
One process at a time works in a run folder (:class:`RunLock`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import filelock

from pipeline.core.config import Config
from pipeline.core.errors import CacheError
from pipeline.core.io import atomic_write_json, file_digest
from pipeline.core.runtime import barrier, from_main_process, is_main_process

MANIFEST = "manifest.json"
LOCK = ".lock"
RESUME_KEY = "resume-key.json"  # in a partial folder: the key it is made under
CHECKPOINT = "checkpoint.pt"  # in a partial folder: the training state at the end of the last epoch
RECAM_CHECKPOINT = "checkpoint-recam.pt"  # the same for cam's second training (cam.recam)


def round_checkpoint(round_index: int) -> str:
    """The same for seg's self-training rounds before the last (seg.self_training)."""
    return f"checkpoint-round-{round_index}.pt"


def is_resume_file(name: str) -> bool:
    """A partial folder's own files (its key, the training checkpoints at its top level), never
    part of a finished stage."""
    return name == RESUME_KEY or (name.startswith("checkpoint") and name.endswith(".pt"))


METRICS = "metrics.json"


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def training_key(inputs: dict) -> str:
    """The key of what a stage computes, without how it is scored: what downstream stages
    record of it, and what lets a stage rescore its finished outputs instead of remaking them."""
    return cache_key({name: value for name, value in inputs.items() if name != "scoring"})


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: bad JSON, or bytes that are not text
        return None


@dataclass
class StageStatus:
    state: str  # "cached", "stale", "damaged" or "missing"
    reason: str


def stage_status(run_dir: Path, stage: str, inputs: dict) -> StageStatus:
    folder = run_dir / stage
    manifest = read_json(folder / MANIFEST)
    if manifest is None or "key" not in manifest:
        return StageStatus("missing", f"no finished output in {folder}")
    if manifest["key"] != cache_key(inputs):
        changes = describe_changes(manifest.get("inputs", {}), inputs)
        # The files (model digests included) are read only where a rescoring would use them.
        if (manifest.get("training_key") == training_key(inputs)
                and check_files(folder, manifest.get("files", {})) is None):
            return StageStatus("stale", f"only its scoring changed ({changes}): rescores what is there")
        return StageStatus("stale", "made under different inputs: " + changes)
    damage = check_files(folder, manifest.get("files", {}))
    if damage:
        return StageStatus("damaged", damage)
    return StageStatus("cached", f"output in {folder} matches the config")


def list_files(folder: Path) -> dict:
    """Every file of a finished stage folder: relative path -> size, and for model files
    (``*.pt``, which a later stage or ``predict`` loads whole) also a content digest."""
    files = {}
    for path in sorted(folder.rglob("*")):
        own = path.name == MANIFEST or (path.parent == folder and is_resume_file(path.name))
        if path.is_file() and not own:
            entry = {"bytes": path.stat().st_size}
            if path.suffix == ".pt":
                entry["digest"] = file_digest(path)
            files[path.relative_to(folder).as_posix()] = entry
    return files


def check_files(folder: Path, files: dict) -> str | None:
    """What is wrong with a stage folder's files against its manifest's list, or None."""
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{path} has {size} bytes, its manifest {entry['bytes']}"
        if "digest" in entry and file_digest(path) != entry["digest"]:
            return f"{path} is not the file its manifest lists (its content changed)"
    return None


def describe_changes(old: dict, new: dict, limit: int = 4) -> str:
    before, after = _flatten(old), _flatten(new)
    changes = []
    unset = object()  # a key one side lacks differs from a key set to None
    for key in sorted(set(before) | set(after)):
        if before.get(key, unset) != after.get(key, unset):
            if key.startswith("upstream."):
                changes.append(f"{key.split('.', 1)[1]} output changed")
            elif key.endswith("data_fingerprint"):
                changes.append("the data files changed" if key == "data_fingerprint"
                               else "the scored masks changed")
            elif key == "version":
                changes.append(f"cache version {before.get(key, '(none)')} -> {after.get(key)} "
                               "(a new release)")
            else:
                name = key.removeprefix("scoring.").removeprefix("config.")
                changes.append(f"{name} {before.get(key, '(unset)')!r} -> {after.get(key, '(unset)')!r}")
    shown = ", ".join(changes[:limit]) + (f" and {len(changes) - limit} more" if len(changes) > limit else "")
    return shown or "unknown change"


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


class StageOutput:
    """Context manager giving a stage a private folder that becomes final only on success.

    The folder, ``<run-dir>/.<stage>.partial/``, belongs to the stage and records the key it
    is made under (``RESUME_KEY``): a run of the same stage under the same key after a kill
    (or Ctrl-C) finds it and ``resumed`` is true, so the stage keeps what is there (training
    checkpoints, per-image outputs, each written atomically); under another key it starts
    over. A Python error deletes it: nothing of a failed stage is kept. Only one process works
    in a run folder (:class:`RunLock`), so no other process's folder is ever touched.

    When the stage's finished folder was made under the same training key (only its scoring
    changed), its files are linked into the new folder and ``reused`` is true: the stage loads
    its network and per-image outputs from there (``previous_metrics`` holds the old metrics,
    the training curves among them) and scores again; with ``reuse`` false (``--force``) it
    never does, and computes everything again."""

    def __init__(self, run_dir: Path, stage: str, inputs: dict, reuse: bool = True):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.inputs = inputs
        self.reuse = reuse
        self.final = self.run_dir / stage
        self.dir = self.run_dir / f".{stage}.partial"
        self.metrics: dict = {}
        self.resumed = False
        self.reused = False
        self.previous_metrics: dict = {}

    def __enter__(self) -> "StageOutput":
        # Under torchrun the main process prepares the folder; the others then write their
        # shares of the per-image outputs into it.
        if is_main_process():
            self._prepare()
        barrier()
        self.resumed, self.reused = from_main_process((self.resumed, self.reused))
        if self.reused:
            self.previous_metrics = read_json(self.dir / METRICS) or {}
        self.started = time.perf_counter()
        return self

    def _prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Old outputs retired but not yet deleted when a kill came between the swap's two renames.
        for leftover in self.run_dir.glob(f".{self.stage}.retired-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        key = cache_key(self.inputs)
        if self.dir.is_dir():
            state = read_json(self.dir / RESUME_KEY) or {}
            # A killed rescoring resumes as one (its network is the finished folder's), unless
            # this run is forced to compute everything again.
            self.resumed = state.get("key") == key and (self.reuse or not state.get("reused", False))
            self.reused = self.resumed and state.get("reused", False)
            if not self.resumed:
                shutil.rmtree(self.dir)
        if self.resumed:  # what a kill left half-written: temporary files of atomic writes
            for leftover in self.dir.rglob(".*.tmp"):
                leftover.unlink()
        else:
            self.reused = self.reuse and self._trained_under_same_key()
            if self.reused:  # hard links: the finished folder stays intact until the swap
                shutil.copytree(self.final, self.dir, copy_function=os.link)
                (self.dir / MANIFEST).unlink()
            else:
                self.dir.mkdir()
            atomic_write_json(self.dir / RESUME_KEY, {"key": key, "reused": self.reused})

    def _trained_under_same_key(self) -> bool:
        manifest = read_json(self.final / MANIFEST) or {}
        return (manifest.get("training_key") == training_key(self.inputs)
                and check_files(self.final, manifest.get("files", {})) is None)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            # An interrupted stage resumes; a failed one restarts.
            if not issubclass(exc_type, KeyboardInterrupt):
                shutil.rmtree(self.dir, ignore_errors=True)
            return False
        barrier()  # every process has written its share
        if is_main_process():
            self._publish()
        barrier()  # nobody reads the stage before it is in place
        return False

    def _publish(self) -> None:
        self.metrics["wall_time_s"] = round(time.perf_counter() - self.started, 2)
        if self.resumed:
            self.metrics["resumed"] = True  # wall_time_s is then this run's share only
        atomic_write_json(self.dir / METRICS, self.metrics)
        atomic_write_json(self.dir / MANIFEST, {
            "stage": self.stage,
            "key": cache_key(self.inputs),
            "training_key": training_key(self.inputs),
            "inputs": self.inputs,
            "files": list_files(self.dir),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        # Swap in the new folder; between the two renames there is no <stage>/ at all,
        # which later runs read as "missing", never as a half-written success.
        retired = self.run_dir / f".{self.stage}.retired-{os.getpid()}"
        if self.final.exists():
            os.replace(self.final, retired)
        os.replace(self.dir, self.final)
        shutil.rmtree(retired, ignore_errors=True)
        # Not in the manifest's list; kept until here for a kill before the swap.
        for path in self.final.iterdir():
            if path.is_file() and is_resume_file(path.name):
                path.unlink()


class RunLock:
    """Exclusive use of a run folder: ``<run-dir>/.lock``, held with filelock's ``flock`` lock
    for the life of the process, the holder's pid written in it. The kernel drops the lock
    when the process dies, however it dies, so a leftover file of a killed run is simply taken
    over; filelock retries when the file it locked was unlinked meanwhile (the inode check)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.lock = filelock.FileLock(self.path, timeout=0, on_acquired=_write_pid)

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except filelock.Timeout:
            try:
                holder = self.path.read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise CacheError(f"run folder {self.path.parent} is in use by process {holder}") from None
        return self

    def __exit__(self, *exc) -> bool:
        # Deleted while still held, so no run folder keeps a lock file; a process that opened
        # this file meanwhile finds it unlinked once it gets the lock, and retries (filelock).
        self.path.unlink(missing_ok=True)
        self.lock.release()
        return False


def _write_pid(fd: int) -> None:
    """The new holder's pid in the lock file, for the error another process's run gives."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)


def manifest_config(manifest: dict) -> dict:
    """The config sections a finished stage recorded in its manifest, its scoring keys merged
    back in (e.g. seg's ``data.val_split`` and ``seg.flip_predict``)."""
    inputs = manifest.get("inputs", {})
    config = json.loads(json.dumps(inputs.get("config", {})))  # a deep copy
    for dotted, value in inputs.get("scoring", {}).get("config", {}).items():
        *path, last = dotted.split(".")
        tree = config
        for name in path:
            tree = tree.setdefault(name, {})
        tree[last] = value
    return config


def upstream_keys(run_dir: Path, stages: list[str]) -> dict:
    """Training keys of the finished upstream outputs a stage is about to read (how an upstream
    stage is scored does not change what it hands on)."""
    keys = {}
    for stage in stages:
        manifest = read_json(Path(run_dir) / stage / MANIFEST)
        if manifest is None or "training_key" not in manifest:
            raise CacheError(f"stage {stage} has no finished output in {run_dir}; "
                             f"run it first: --stages {stage}")
        keys[stage] = manifest["training_key"]
    return keys


# Data keys that only say how a stage is scored: under the inputs' "scoring" entry, never the
# training key. (val_split is seg's to predict and score; cam and refine never read it.)
SCORING_DATA_KEYS = ("data.score_split", "data.volume_pattern", "data.spacing", "data.spacing_file")


# Keys that change how fast a stage runs but never what it computes; they stay out of cache keys.
EXECUTION_ONLY_KEYS = {"device", "num_threads", "refine.workers"}
# Options added after caches were made, whose default computes what those caches hold: at the
# default they leave no trace in a key, so the caches stay valid.
NO_TRACE_AT_DEFAULT = {"cam.sr.detail_gate": "none", "cam.sr.detail_target": "classes",
                       "seg.sr.detail_gate": "none", "seg.sr.detail_target": "classes",
                       "cam.train.rotation": 0.0, "seg.train.rotation": 0.0,
                       "refine.affinity.train.rotation": 0.0, "refine.irn.train.rotation": 0.0,
                       "mixed.w_dmpls": 0.0}


def section_for_cache(cfg: Config, *keys: str, omit: tuple[str, ...] = ()) -> dict:
    """The listed top-level sections/keys of ``cfg`` without execution-only keys, the dotted
    keys in ``omit`` (at any depth) and the options of NO_TRACE_AT_DEFAULT at their default; a
    switched-off feature (a section with ``enabled: false``) is left out, so tuning its
    parameters while it is off does not invalidate the cache."""
    full = dataclasses.asdict(cfg)
    picked = {k: full[k] for k in keys}
    for dotted in EXECUTION_ONLY_KEYS | set(omit) | set(NO_TRACE_AT_DEFAULT):
        *path, last = dotted.split(".")
        tree = picked
        for name in path:
            tree = tree.get(name) if isinstance(tree, dict) else None
        if isinstance(tree, dict) and last in tree and (
                dotted not in NO_TRACE_AT_DEFAULT or tree[last] == NO_TRACE_AT_DEFAULT[dotted]):
            tree.pop(last)
    return _drop_disabled(picked)


def config_values(cfg: Config, *dotted: str) -> dict:
    """The values of the listed dotted keys, e.g. ``{"data.spacing": None}``."""
    full = dataclasses.asdict(cfg)
    values = {}
    for key in dotted:
        value = full
        for name in key.split("."):
            value = value[name]
        values[key] = value
    return values


def _drop_disabled(tree):
    """``tree`` without its switched-off sections: a feature that is off leaves no trace in a
    key, so a release that adds one, off by default, keeps every cache made before it."""
    if not isinstance(tree, dict):
        return tree
    return {key: _drop_disabled(value) for key, value in tree.items()
            if not (isinstance(value, dict) and value.get("enabled") is False)}
