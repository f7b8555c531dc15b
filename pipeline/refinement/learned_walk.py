"""What PSA's and IRNet's walks share: a network trained on CRF masks, cached in its own
folder of the run folder, and a random walk of the CAMs along what it learnt.

The network and the CRF masks it learnt from are cached in ``<run-dir>/<network_folder>/``
under their own key, which leaves out the walk's settings and the scoring, so rerunning
refine with only those changed reuses the trained network. The refine stage's folder then
holds ``crf/`` (those CRF masks) beside ``pseudo/`` (the walked masks).
"""
from __future__ import annotations

import copy
import functools
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from pipeline.core.cache import CHECKPOINT, METRICS, StageOutput, StageStatus, read_json, stage_status
from pipeline.core.config import DataConfig, TrainConfig
from pipeline.core.runtime import (
    barrier,
    is_main_process,
    parallel_map,
    seed_everything,
    select_device,
    shard,
)
from pipeline.core.training import (
    LossFn,
    load_checkpoint,
    loss_curve,
    make_train_loader,
    save_checkpoint,
    train,
)
from pipeline.data.dataset import open_dataset, score_ids
from pipeline.data.training_set import MaskFolder, TrainingSet, normalize
from pipeline.methods.cams import load_cams
from pipeline.models.backbones import weights_fingerprint
from pipeline.refinement.masks import (
    MaskMaker,
    collect_scores,
    save_and_score,
    with_gain,
    write_crf_masks,
    written,
)
from pipeline.refinement.method import RefineMethod


class LearnedWalk(RefineMethod):
    """A walk along a learned network. Subclasses name their two config sections
    (``sections``: the network's, then the walk's) and give the network, its loss, the CRF
    masks it learns from, the walked scores of an image and the mask made from them."""

    @property
    def network_cfg(self):
        return getattr(self.cfg.refine, self.sections[0])

    @property
    def walk_cfg(self):
        return getattr(self.cfg.refine, self.sections[1])

    def cache_config(self) -> dict:
        # Seeded: the network's initial weights and its batches depend on the seed.
        return {"seed": self.cfg.seed} | super().cache_config()

    def cache_inputs(self) -> dict:
        return {"weights_fingerprint": weights_fingerprint(self.network_cfg.backbone,
                                                           f"refine.{self.sections[0]}.backbone.weights")}

    # --- what a walk method gives --------------------------------------------------------

    def build_network(self) -> nn.Module:
        raise NotImplementedError

    def training_loss(self) -> LossFn:
        raise NotImplementedError

    def label_masks(self) -> MaskMaker | None:
        """The CRF masks the network learns from; None: refine's two thresholds."""
        return None

    def network_batch(self, image: torch.Tensor) -> torch.Tensor:
        """What the walk feeds the network for one 3 x H x W image."""
        raise NotImplementedError

    def walked_scores(self, model: nn.Module, image: torch.Tensor, cams: np.ndarray) -> np.ndarray:
        """The background map(s), then the K CAMs, walked, at the image's size."""
        raise NotImplementedError

    def mask_from_scores(self) -> MaskMaker:
        """``(image, walked scores, classes) -> mask``, a picklable function: the refine
        workers run it."""
        raise NotImplementedError

    def metrics(self) -> dict:
        """The method's own settings worth reporting beside the scores."""
        return {}

    # --- the network, trained once and cached --------------------------------------------

    def network_inputs(self, refine_inputs: dict) -> dict:
        """The cached network's inputs: refine's training inputs except the walk's settings, the
        region snapping of the final masks and the method switch (the network depends on none)."""
        inputs = copy.deepcopy({name: value for name, value in refine_inputs.items() if name != "scoring"})
        refine = inputs["config"]["refine"]
        for key in ("method", self.sections[1], "regions"):
            refine.pop(key, None)
        return inputs

    def network_status(self, run_dir: Path, refine_inputs: dict) -> tuple[str, StageStatus] | None:
        return self.network_folder, stage_status(run_dir, self.network_folder,
                                                 self.network_inputs(refine_inputs))

    def prepare(self, run_dir: Path, refine_inputs: dict) -> None:
        """The trained network, from the cache when its key matches, else made now (CRF masks,
        training), with its folder (``crf/``: the CRF masks it learnt from)."""
        cfg = self.cfg
        dataset = open_dataset(cfg.data)
        self.device = select_device(cfg.device)
        self.network_dir = run_dir / self.network_folder
        inputs = self.network_inputs(refine_inputs)
        # Seeded before the network is built: its initial weights must not depend on whether cam
        # ran earlier in this process (one cache key, one network).
        generator = seed_everything(cfg.seed)
        model = self.build_network()
        if stage_status(run_dir, self.network_folder, inputs).state == "cached":
            load_checkpoint(self.network_dir / "model.pt", model)
            if is_main_process():
                print(f"refine: reusing the network in {self.network_dir} (its inputs are unchanged)",
                      file=sys.stderr)
            self.model = model.to(self.device).eval()
            return
        net_cfg: TrainConfig = self.network_cfg.train
        with StageOutput(run_dir, self.network_folder, inputs) as out:
            train_ids = dataset.split_ids(cfg.data.train_split)
            crf_scores = write_crf_masks(cfg, run_dir, shard(train_ids), out.dir / "crf", out.resumed,
                                         self.label_masks())
            barrier()  # the network trains on every process's CRF masks
            started = time.perf_counter()
            crf_masks = MaskFolder(out.dir / "crf")
            train_set = TrainingSet(dataset, train_ids, net_cfg, pixel_labels={"mask": crf_masks})
            loader = make_train_loader(train_set, net_cfg, cfg.data.loader_workers, generator)
            history = train(model.to(self.device), loader, self.training_loss(), net_cfg, self.device,
                            self.network_folder, out.dir / CHECKPOINT)
            save_checkpoint(out.dir / "model.pt", model)
            # The loss terms and the negative pairs' mean affinity per epoch: an under-trained
            # network shows as a high neg_affinity and a still-falling neg term.
            out.metrics = {"crf": crf_scores, "train_steps": len(history) * len(loader),
                           "train_seconds": round(time.perf_counter() - started, 1)} | {
                f"train_{term}_by_epoch": loss_curve(history, term)
                for term in ("loss", "bg", "fg", "neg", "neg_affinity")}
        self.model = model.to(self.device).eval()

    # --- the walk ------------------------------------------------------------------------

    def make_masks(self, run_dir: Path, out: StageOutput, ids: list[str], cam_miou: float | None) -> dict:
        cfg = self.cfg
        dataset = open_dataset(cfg.data)
        keep = out.resumed or out.reused
        if is_main_process() and not out.reused:
            shutil.copytree(self.network_dir / "crf", out.dir / "crf", dirs_exist_ok=out.resumed)
        (out.dir / "pseudo").mkdir(exist_ok=True)
        walked = self._walk_all(ids, run_dir / "cam" / "cams", out.dir / "pseudo" if keep else None)
        task = functools.partial(_walk_mask_one, data=cfg.data, scored=score_ids(cfg.data, dataset),
                                 out_dir=out.dir / "pseudo", keep=keep,
                                 make_mask=self.final_masks(self.mask_from_scores()))
        with parallel_map(task, walked, cfg.refine.workers) as results:
            scores = collect_scores(results, len(ids), dataset.classes, "refine (random walk)")
        net_metrics = read_json(self.network_dir / METRICS) or {}
        return self.metrics() | with_gain(scores, cam_miou) | {
            "crf": with_gain(net_metrics.get("crf") or {}, cam_miou),
            "net_train_steps": net_metrics.get("train_steps"),
            "net_train_seconds": net_metrics.get("train_seconds"),
        }

    def _walk_all(self, ids: list[str], cam_dir: Path, done: Path | None) -> Iterator:
        """(id, walked scores as float16, classes) per image, computed on the network's device;
        none for the images whose mask is already in the folder ``done``."""
        dataset = open_dataset(self.cfg.data)
        for image_id in ids:
            cams, classes = load_cams(cam_dir, image_id)
            if len(classes) == 0 or (done is not None and (done / f"{image_id}.png").is_file()):
                yield image_id, None, classes
                continue
            image = normalize(dataset.load_image(image_id)).to(self.device)
            yield image_id, self.walked_scores(self.model, image, cams).astype(np.float16), classes


def _walk_mask_one(item, data: DataConfig, scored: set[str], out_dir: Path, make_mask: MaskMaker, keep: bool):
    """Worker task: the final mask of one image from its walked scores, written and scored."""
    image_id, scores, classes = item
    mask = written(out_dir, image_id, keep)
    if mask is None:
        image = open_dataset(data).load_image(image_id)
        # No class in the image label (nothing was walked): every pixel is background.
        mask = (np.zeros(image.shape[:2], dtype=np.uint8) if len(classes) == 0
                else make_mask(image, scores.astype(np.float32), classes))
    return save_and_score(image_id, mask, data, scored, out_dir)
