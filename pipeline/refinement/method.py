"""The interface every refine method implements, and the CRF method itself.

A refine method turns the cam stage's CAMs into pseudo masks (0 background, 1..C-1
classes, 255 unsure). It says three things: what it adds to refine's cache key
(:meth:`RefineMethod.cache_config`, :meth:`RefineMethod.cache_inputs`), the network it trains
if any (:attr:`RefineMethod.network_folder`, :meth:`RefineMethod.prepare`), and the masks it
makes (:meth:`RefineMethod.make_masks`). Adding a method is one new module with one
subclass, listed in pipeline/refinement/__init__.py.
"""
from __future__ import annotations

import functools
from pathlib import Path

from pipeline.core.cache import SCORING_DATA_KEYS, StageOutput, StageStatus, section_for_cache
from pipeline.core.config import Config
from pipeline.methods.regions import snapped
from pipeline.refinement import masks
from pipeline.refinement.masks import MaskMaker, with_gain, write_crf_masks


class RefineMethod:
    name = ""  # the value of refine.method that selects it
    # refine's sub-sections it reads besides crf and regions, which every method uses; another
    # method's sections are left out of its cache key.
    sections: tuple[str, ...] = ()
    # The folder, in the run folder, of the network it trains and caches (None: trains none).
    network_folder: str | None = None

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def uses_thresholds(self) -> bool:
        """Whether its masks read refine's two thresholds (``refine.thresholds`` and the
        ``fg_threshold`` / ``bg_threshold`` it sets)."""
        return True

    def cache_config(self) -> dict:
        """The config values refine's masks depend on under this method."""
        config = section_for_cache(self.cfg, "data", "refine", omit=SCORING_DATA_KEYS + ("data.val_split",))
        shared = ("crf", "regions")
        config["refine"] = {key: value for key, value in config["refine"].items()
                            if not isinstance(value, dict) or key in shared or key in self.sections}
        # The default rule (fixed) leaves no trace, so caches made before the rule existed stay
        # valid; under otsu or yen the two thresholds stay in the key: they stand in where the CAMs
        # leave nothing to split.
        if not self.uses_thresholds():
            unused = ("fg_threshold", "bg_threshold", "thresholds")
        else:
            unused = ("thresholds",) if self.cfg.refine.thresholds == "fixed" else ()
        for key in unused:
            config["refine"].pop(key)
        return config

    def cache_inputs(self) -> dict:
        """Inputs besides the config and the data (e.g. the network's initial weights)."""
        return {}

    def network_status(self, run_dir: Path, refine_inputs: dict) -> tuple[str, StageStatus] | None:
        """The folder and state of the network it would train under ``refine_inputs``, for
        ``--dry-run``; None when it trains none."""
        return None

    def prepare(self, run_dir: Path, refine_inputs: dict) -> None:
        """Before the masks: trains the method's network, or loads it from its cached folder."""

    def final_masks(self, make_mask: MaskMaker) -> MaskMaker:
        """The method's own mask maker, voted within image regions where ``refine.regions`` is on
        (for the final masks only: a walk's network still learns from unsnapped CRF masks)."""
        if not self.cfg.refine.regions.enabled:
            return make_mask
        return functools.partial(snapped, make_mask, cfg=self.cfg.refine.regions)

    def make_masks(self, run_dir: Path, out: StageOutput, ids: list[str], cam_miou: float | None) -> dict:
        """Writes the pseudo masks of ``ids`` to ``out.dir / "pseudo"``; returns their scores
        and the method's own metrics."""
        raise NotImplementedError


class CrfMasks(RefineMethod):
    """``refine.method: crf``: the CRF masks of refine's two thresholds (pipeline/refinement/masks.py)."""
    name = "crf"

    def make_masks(self, run_dir: Path, out: StageOutput, ids: list[str], cam_miou: float | None) -> dict:
        make_mask = self.final_masks(functools.partial(masks.pseudo_mask, cfg=self.cfg.refine))
        scores = write_crf_masks(self.cfg, run_dir, ids, out.dir / "pseudo", keep=out.resumed or out.reused,
                                 make_mask=make_mask)
        return with_gain(scores, cam_miou)
