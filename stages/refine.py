"""Stage refine: CAMs -> pseudo masks (0 background, 1..C-1 classes, 255 unsure).

``refine.method`` picks how (pipeline/refinement/): ``crf``, the CRF masks of refine's two
thresholds; ``affinity``, PSA's AffinityNet and random walk; ``irn``, IRNet's boundary map
and random walk. A walk's network is cached in its own folder of the run folder
(``affinitynet/``, ``irn/``), so rerunning refine with only the walk's settings changed
reuses it.

Outputs in ``<run-dir>/refine/``: ``pseudo/<id>.png`` (the final masks, what seg trains
on; palette PNGs), with a walk also ``crf/<id>.png`` (the CRF masks its network learnt
from), and ``metrics.json`` scoring every set of masks on the scored ids.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.cache import METRICS, StageOutput, StageStatus, config_values, read_json, upstream_keys
from pipeline.core.config import Config
from pipeline.core.runtime import shard
from pipeline.data.dataset import open_dataset, score_split
from pipeline.refinement import method_for
from pipeline.refinement.masks import with_thresholds_from_cams

NAME = "refine"
# The cache version: raised when a release changes what refine computes from the same config
# and data, so that caches made before are stale once (README, "Outputs and the cache").
VERSION = 1


def upstream(cfg: Config) -> list[str]:
    return ["cam"]


def own_inputs(cfg: Config) -> dict:
    """The masks depend on the CAMs, the train images and the method's settings; which masks
    score them is the scoring part (changing it rescores the masks there)."""
    dataset = open_dataset(cfg.data)
    method = method_for(cfg)
    return {"version": VERSION, "config": method.cache_config(),
            "data_fingerprint": dataset.fingerprint(cfg.data.train_split)} | method.cache_inputs() | {
        "scoring": {"config": config_values(cfg, "data.score_split"),
                    "data_fingerprint": dataset.fingerprint(scored_splits=[score_split(cfg.data)])}}


def network_status(cfg: Config, run_dir: Path, refine_inputs: dict) -> tuple[str, StageStatus] | None:
    """The folder and state of the network refine's method trains, for ``--dry-run``; None
    when the method trains none."""
    return method_for(cfg).network_status(run_dir, refine_inputs)


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    """``force``: compute everything again, even what a finished folder under the same key holds."""
    dataset = open_dataset(cfg.data)
    train_ids = shard(dataset.split_ids(cfg.data.train_split))
    inputs = own_inputs(cfg) | {"upstream": upstream_keys(run_dir, upstream(cfg))}
    method = method_for(cfg)
    thresholds = {}
    if method.uses_thresholds():  # Otsu's histogram only where the thresholds are read
        method = method_for(with_thresholds_from_cams(cfg, run_dir / "cam" / "cams", train_ids))
        thresholds = {key: getattr(method.cfg.refine, key)
                      for key in ("thresholds", "fg_threshold", "bg_threshold")}
    cam_miou = (read_json(run_dir / "cam" / METRICS) or {}).get("miou")
    method.prepare(run_dir, inputs)
    with StageOutput(run_dir, NAME, inputs, reuse=not force) as out:
        masks = method.make_masks(run_dir, out, train_ids, cam_miou)
        out.metrics = {"method": method.name, "regions": cfg.refine.regions.enabled} | masks | thresholds
    return out.metrics
