"""``<run-dir>/report.html``: what a run did, as a page a person opens from disk.

Per stage: the scores (overall and per class, a bar chart), the training loss curves and
the wall times; then a gallery of a fixed, seeded sample of train and val images, and of
the worst-scored ones where masks exist: image | CAM heat map per class | pseudo mask |
prediction | ground truth, under a class colour legend. Figures are PNGs in
``<run-dir>/report/``, linked relatively, so the folder can be copied or zipped whole.
Written after every run; ``run_pipeline.py report --run-dir RUN`` rebuilds it.
"""
from __future__ import annotations

import argparse
import html
import io
import os
import random
import shutil
import sys
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")  # files only, no screen


import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.core.cache import MANIFEST, METRICS, RunLock, manifest_config, read_json
from pipeline.core.config_file import config_from_dict
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, load_arrays, load_mask, voc_palette
from pipeline.core.metrics import confusion_matrix, iou_scores
from pipeline.data.dataset import IGNORE, VOCDataset, open_dataset
from stages import RUN_FOLDERS

REPORT = "report.html"


FIGURES = "report"  # the page's figures, beside it


SAMPLE = 4  # seeded random images per split in the gallery


WORST = 2  # worst-scored images per split, where masks exist


WORST_POOL = 300  # ids scored to find the worst ones (a seeded sample on large data sets)


THUMB = 160  # gallery cell height in pixels


SCORED_ON = {name: "val" if name == "seg" else "train" for name in RUN_FOLDERS}  # the split a stage scores


def _png(figure_or_array) -> bytes:
    buffer = io.BytesIO()
    if isinstance(figure_or_array, np.ndarray):
        Image.fromarray(figure_or_array).save(buffer, format="PNG")
    else:
        figure_or_array.savefig(buffer, format="PNG", dpi=100, bbox_inches="tight")
        plt.close(figure_or_array)
    return buffer.getvalue()


def _colours() -> np.ndarray:
    return np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)


def _thumb(array: np.ndarray, nearest: bool = False) -> np.ndarray:
    image = Image.fromarray(array)
    width = max(1, round(image.width * THUMB / image.height))
    return np.array(image.resize((width, THUMB), Image.NEAREST if nearest else Image.BILINEAR))


def _heat(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    colour = plt.get_cmap("jet")(np.clip(cam.astype(np.float32), 0, 1))[..., :3] * 255
    return np.round(0.5 * image + 0.5 * colour).astype(np.uint8)


def _stage_data(run_dir: Path) -> dict:
    stages = {}
    for name in RUN_FOLDERS:
        metrics, manifest = read_json(run_dir / name / METRICS), read_json(run_dir / name / MANIFEST)
        if metrics is not None and manifest is not None:
            stages[name] = {"metrics": metrics, "config": manifest_config(manifest)}
    return stages


def _open_data(stages: dict):
    """The data set the run read, from a manifest's recorded config; None if it is gone."""
    for stage in stages.values():
        if "data" in stage["config"]:
            try:
                return open_dataset(config_from_dict({"data": stage["config"]["data"]}).data)
            except PipelineError:
                return None
    return None


def _score_figure(stages: dict, classes: list[str]):
    scored = {name: s["metrics"] for name, s in stages.items() if s["metrics"].get("per_class_iou")}
    if not scored:
        return None
    figure, axes = plt.subplots(figsize=(max(6.0, 0.45 * len(classes) + 2), 3.5))
    width = 0.8 / len(scored)
    for k, (name, metrics) in enumerate(scored.items()):
        values = [metrics["per_class_iou"].get(c) for c in classes]
        axes.bar(np.arange(len(classes)) + k * width, [100 * (v or 0) for v in values], width,
                 label=f"{name}, {SCORED_ON[name]} (mIoU {100 * metrics['miou']:.1f})")
    axes.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=45, ha="right")
    axes.set_ylabel("IoU (%)")
    axes.set_ylim(0, 100)
    axes.legend(fontsize="small")
    axes.set_title("IoU per class")
    return figure


def _loss_figure(stages: dict):
    curves = {name: s["metrics"]["train_loss_by_epoch"] for name, s in stages.items()
              if s["metrics"].get("train_loss_by_epoch")}
    if not curves:
        return None
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name, losses in curves.items():
        axes.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3, label=name)
    axes.set_xlabel("epoch")
    axes.set_ylabel("mean training loss")
    axes.legend(fontsize="small")
    axes.set_title("Training loss")
    return figure


def _per_image_miou(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    pred = np.where(pred == IGNORE, 0, pred).astype(np.uint8)
    return iou_scores(confusion_matrix(gt, pred, num_classes), [str(i) for i in range(num_classes)])["miou"]


def _gallery_ids(ids: list[str], dataset: VOCDataset, prediction_dir: Path | None,
                 seed: int) -> list[tuple[str, str]]:
    """(id, why) pairs: a seeded sample, then the worst-scored of the ids with a mask and a prediction."""
    rng = random.Random(seed)
    picked = [(i, "sample") for i in rng.sample(ids, min(SAMPLE, len(ids)))]
    if prediction_dir is None:
        return picked
    pool = [i for i in ids if dataset.has_mask(i) and (prediction_dir / f"{i}.png").is_file()]
    pool = rng.sample(pool, min(WORST_POOL, len(pool)))

    def miou(image_id: str) -> float:
        predicted = load_mask(prediction_dir / f"{image_id}.png")
        return _per_image_miou(dataset.load_mask(image_id), predicted, dataset.num_classes)

    scored = sorted(pool, key=miou)
    shown = {i for i, _ in picked}
    worst = [i for i in scored if i not in shown][:WORST]
    return picked + [(i, "worst") for i in worst]


def _gallery_row(run_dir: Path, out: Path, dataset: VOCDataset, split: str, image_id: str, why: str) -> str:
    colours = _colours()
    image = dataset.load_image(image_id)
    cells = [("image", _thumb(image))]
    cam_file = run_dir / "cam" / "cams" / f"{image_id}.npz"
    if cam_file.is_file():
        arrays = load_arrays(cam_file)
        for cam, cls in zip(arrays["cams"], arrays["classes"]):
            cells.append((f"CAM {dataset.classes[int(cls)]}", _thumb(_heat(image, cam))))
    for title, path in (("pseudo mask", run_dir / "refine" / "pseudo" / f"{image_id}.png"),
                        ("prediction", run_dir / "seg" / "predictions" / f"{image_id}.png")):
        if path.is_file():
            cells.append((title, _thumb(colours[load_mask(path)], nearest=True)))
    if dataset.has_mask(image_id):
        cells.append(("ground truth", _thumb(colours[dataset.load_mask(image_id)], nearest=True)))
    html_cells = []
    for k, (title, array) in enumerate(cells):
        name = f"{split}_{image_id}_{k}.png"
        atomic_write_bytes(out / "gallery" / name, _png(array))
        source = f"{FIGURES}/gallery/{html.escape(quote(name))}"
        html_cells.append(f'<figure><img src="{source}" alt="{html.escape(title)}">'
                          f"<figcaption>{html.escape(title)}</figcaption></figure>")
    label = f"{split} · {html.escape(image_id)}" + (" · worst scored" if why == "worst" else "")
    return f'<div class="row"><div class="id">{label}</div>{"".join(html_cells)}</div>'


def _fmt(value, scale=100.0, digits=1) -> str:
    return "–" if value is None else f"{scale * value:.{digits}f}"


def write_report(run_dir: Path) -> Path:
    """Writes ``<run-dir>/report.html`` and its figures; returns the page's path."""
    run_dir = Path(run_dir)
    stages = _stage_data(run_dir)
    dataset = _open_data(stages)
    classes = dataset.classes if dataset is not None else []
    seed = next((s["config"]["seed"] for s in stages.values() if "seed" in s["config"]), 0)
    # The figures are built in a private folder that replaces the old one when complete.
    for leftover in run_dir.glob(f".{FIGURES}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    out = run_dir / f".{FIGURES}.partial-{os.getpid()}"
    (out / "gallery").mkdir(parents=True)
    body = [f"<h1>Run {html.escape(run_dir.name)}</h1>"]
    if classes:
        swatches = "".join(f'<span class="swatch"><i style="background: '
                           f'rgb{tuple(int(c) for c in _colours()[k])}"></i>'
                           f"{k} {html.escape(name)}</span>" for k, name in enumerate(classes))
        body.append(f'<h2>Classes</h2><p class="legend">{swatches}'
                    '<span class="swatch"><i style="background: rgb(224, 224, 192)"></i>255 unsure</span>'
                    '</p>')
    rows = []
    for name, stage in stages.items():
        metrics = stage["metrics"]
        if metrics.get("miou") is not None:
            score = f"{_fmt(metrics['miou'])}"
        elif "miou" in metrics:
            score = html.escape(f"not scored ({metrics.get('not_scored', 'no masks')})")
        else:
            score = "–"
        rows.append(f"<tr><td>{name}</td><td>{score}</td><td>{SCORED_ON[name]}</td>"
                    f"<td>{metrics.get('scored_images', '–')}</td>"
                    f"<td>{metrics.get('wall_time_s', 0):.1f}</td></tr>")
    body.append("<h2>Stages</h2><table><tr><th>stage</th><th>mIoU (%)</th><th>scored on</th>"
                f"<th>images scored</th><th>wall time (s)</th></tr>{''.join(rows)}</table>")
    per_class = [(name, s["metrics"]["per_class_iou"]) for name, s in stages.items()
                 if s["metrics"].get("per_class_iou")]
    if per_class and classes:
        header = "".join(f"<th>{name} ({SCORED_ON[name]})</th>" for name, _ in per_class)
        lines = "".join(f"<tr><td>{html.escape(c)}</td>"
                        + "".join(f"<td>{_fmt(ious.get(c))}</td>" for _, ious in per_class)
                        + "</tr>" for c in classes)
        body.append(f"<h2>IoU per class (%)</h2><table><tr><th>class</th>{header}</tr>{lines}</table>")
    for title, figure in (("scores", _score_figure(stages, classes)), ("losses", _loss_figure(stages))):
        if figure is not None:
            atomic_write_bytes(out / f"{title}.png", _png(figure))
            body.append(f'<p><img src="{FIGURES}/{title}.png" alt="{title}"></p>')
    if dataset is None:
        body.append("<h2>Gallery</h2><p>The run's data folder is not readable from here: no gallery.</p>")
    elif stages:
        gallery = []
        # seg's record has the val split (cam's and refine's never read it).
        data_cfg = next(s["config"]["data"] for s in reversed(stages.values()) if "data" in s["config"])
        train_ids = dataset.split_ids(data_cfg["train_split"])
        val_ids = dataset.split_ids(data_cfg["val_split"]) if "val_split" in data_cfg else []
        pseudo_dir = run_dir / "refine" / "pseudo"
        for split, ids, predictions in (("train", train_ids, pseudo_dir if pseudo_dir.is_dir() else None),
                                        ("val", val_ids, run_dir / "seg" / "predictions")):
            if ids:
                predictions = predictions if predictions is not None and predictions.is_dir() else None
                gallery += [_gallery_row(run_dir, out, dataset, split, image_id, why)
                            for image_id, why in _gallery_ids(ids, dataset, predictions, seed)]
        body.append("<h2>Gallery</h2><p>A seeded sample of each split, then its worst-scored images "
                    "(train: by the pseudo masks, val: by the predictions).</p>" + "".join(gallery))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Run {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.legend .swatch {{ display: inline-block; margin-right: 1em; }}
.swatch i {{ display: inline-block; width: 1em; height: 1em; margin-right: 0.3em; vertical-align: middle;
  border: 1px solid #888; }}
.row {{ display: flex; flex-wrap: wrap; align-items: flex-start; gap: 0.4em; margin-bottom: 0.8em; }}
.row .id {{ width: 10em; font-size: small; }}
figure {{ margin: 0; font-size: small; text-align: center; }}
</style></head><body>
{chr(10).join(body)}
</body></html>
"""
    final = run_dir / FIGURES
    if final.exists():
        shutil.rmtree(final)
    os.replace(out, final)
    atomic_write_bytes(run_dir / REPORT, page.encode())
    return run_dir / REPORT


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run_pipeline.py report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not _stage_data(run_dir):
        print(f"error: {run_dir} holds no finished stage to report", file=sys.stderr)
        return 2
    try:
        with RunLock(run_dir):
            print(f"report: {write_report(run_dir)}")
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
