"""``run_pipeline.py predict``: segment any images with a finished run's seg network.

The network is rebuilt from the config recorded in ``<run-dir>/seg/manifest.json`` (no
config needs to be passed again) and loaded from ``seg/model.pt``; it predicts as the seg
stage does (the student in mixed mode, the flip average when ``seg.flip_predict``, the CRF
with ``seg.crf_predict``, each class's largest component per volume of ``data.volume_pattern``
or per image with ``seg.largest_component``).
Writes ``<out>/<name>.png`` (palette PNG of class indices, the VOC palette) and, with
``--overlay``, ``<out>/<name>_overlay.jpg`` (the classes' colours over the image). An image
that cannot be read is named on stderr and skipped; the others are still written, and
the exit code is 1 at the end.
"""
from __future__ import annotations

import argparse
import functools
import io
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.commands.report import FIGURES
from pipeline.core.cache import MANIFEST, manifest_config, read_json
from pipeline.core.config import Config
from pipeline.core.config_file import config_from_dict
from pipeline.core.errors import CacheError, DataError, PipelineError
from pipeline.core.io import atomic_write_bytes, load_mask, read_rgb, save_mask, voc_palette
from pipeline.core.runtime import configure_threads, select_device
from pipeline.core.training import load_checkpoint
from pipeline.data.dataset import IMAGE_SUFFIXES
from pipeline.data.labels import read_text
from pipeline.data.training_set import normalize
from pipeline.data.volumes import volume_and_order
from pipeline.methods.components import keep_largest_components
from pipeline.models.networks import predict_batch, predict_with_crf, segmentation_network
from stages import RUN_FOLDERS

OVERLAY_ALPHA = 0.5  # share of the class colour in an overlay pixel (background pixels keep the image)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run_pipeline.py predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a run folder with a finished seg stage")
    parser.add_argument("--images", required=True,
                        help="a folder of images (not its subfolders), one image, or a .txt list of image "
                             "paths (one per line, relative to the list's folder)")
    parser.add_argument("--out", required=True, help="output folder (created; must not be an input folder)")
    parser.add_argument("--overlay", action="store_true", help="also write <name>_overlay.jpg")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=0,
                        help="same-sized images per forward pass (default: 8 on CUDA, 1 on the CPU, where "
                             "batch 1 reproduces the seg stage's predictions bit for bit)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def recorded_config(run_dir: Path) -> tuple[Config, list[str]]:
    """The seg stage's config as its manifest records it, and the class names beside its model."""
    seg_dir = run_dir / "seg"
    manifest = read_json(seg_dir / MANIFEST)
    if manifest is None or not (seg_dir / "model.pt").is_file():
        raise CacheError(f"{run_dir} has no finished seg stage ({seg_dir / MANIFEST} and model.pt): "
                         "run the pipeline's seg stage first")
    recorded = manifest_config(manifest)
    # refine: its crf kernels, recorded with seg's scoring keys where seg.crf_predict is on.
    cfg = config_from_dict({key: recorded[key] for key in ("mode", "data", "seg", "mixed", "refine")
                            if key in recorded})
    cfg.seg.backbone.weights = None  # every weight comes from model.pt; no ImageNet file is needed
    classes_file = seg_dir / "classes.txt"
    if not classes_file.is_file():  # runs made before seg wrote its classes: the data folder's
        classes_file = Path(cfg.data.root) / "classes.txt"
    if not classes_file.is_file():
        raise CacheError(f"{seg_dir / 'classes.txt'} is missing: rerun the seg stage (--stages seg --force)")
    return cfg, [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]


def list_images(source: Path) -> list[Path]:
    """The images to segment: a folder's image files (sorted), one image, or a list file's paths."""
    if source.is_dir():
        images = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"--images {source}: the folder holds no {'/'.join(IMAGE_SUFFIXES)} files")
        return images
    if not source.is_file():
        raise DataError(f"--images {source} does not exist")
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return [source]
    lines = read_text(source, 'one image path per line').splitlines()
    images = [source.parent / line.strip() for line in lines if line.strip()]
    if not images:
        raise DataError(f"--images {source}: the list names no images")
    return images


def output_names(images: list[Path], out: Path, run_dir: Path) -> list[str]:
    """One output name per image (its file name without the suffix), checked before any work:
    no two images may share one, no image may lie in the output folder, and the output
    folder may not be one that a run of the pipeline rewrites (its stage, partial and report
    folders, or the run folder itself)."""
    target, run = out.resolve(), run_dir.resolve()
    inside = target.relative_to(run).parts if target.is_relative_to(run) else None
    rewritten = inside is not None and (not inside or inside[0] in RUN_FOLDERS + (FIGURES,)
                                        or inside[0].startswith("."))
    if rewritten:
        raise DataError(f"--out {out} is the run folder or one of the folders a run rewrites ({run_dir}/"
                        f"{inside[0] if inside else ''}): choose another output folder, "
                        f"e.g. {run_dir / 'predicted'}")
    seen = {}
    for image in images:
        if image.parent.resolve() == out.resolve():
            raise DataError(f"--out {out} is the folder of the input image {image}: "
                            "choose another output folder")
        if image.stem in seen:
            raise DataError(f"--images: {seen[image.stem]} and {image} would both be written as "
                            f"{image.stem}.png")
        seen[image.stem] = image
    return list(seen)


def overlay_jpeg(image: np.ndarray, mask: np.ndarray) -> bytes:
    colours = np.array(voc_palette(), dtype=np.float32).reshape(256, 3)[mask]
    blended = np.where((mask == 0)[..., None], image, (1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colours)
    buffer = io.BytesIO()
    Image.fromarray(np.round(blended).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        run_dir, out = Path(args.run_dir), Path(args.out)
        cfg, classes = recorded_config(run_dir)
        images = list_images(Path(args.images))
        names = output_names(images, out, run_dir)
        if args.batch_size < 0:
            raise PipelineError("--batch-size must be >= 1 (or 0 for the default)")
        configure_threads(args.threads)
        device = select_device(args.device)
        model = segmentation_network(cfg, len(classes), training=False)
        try:
            load_checkpoint(run_dir / "seg" / "model.pt", model)
        except (RuntimeError, OSError) as error:
            raise CacheError(f"{run_dir / 'seg' / 'model.pt'} does not load into the recorded network "
                             f"({' '.join(str(error).split())[:200]}): rerun the seg stage") from None
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model.to(device).eval()
    batch_size = args.batch_size or (8 if device.type == "cuda" else 1)
    out.mkdir(parents=True, exist_ok=True)
    started, failed, pending, done = time.perf_counter(), [], [], []
    path_of = dict(zip(names, images))

    def flush():
        if cfg.seg.crf_predict:  # as the seg stage predicted: each image's softmax through the CRF
            masks = [predict_with_crf(model.forward, tensor.to(device), pixels, cfg.seg.flip_predict,
                                      cfg.refine.crf) for _, pixels, tensor in pending]
        else:
            masks = predict_batch(model.forward, [tensor.to(device) for _, _, tensor in pending],
                                  cfg.seg.flip_predict)
        for (name, pixels, _), mask in zip(pending, masks):
            save_mask(out / f"{name}.png", mask)
            if args.overlay and not cfg.seg.largest_component:  # else drawn once post-processed
                atomic_write_bytes(out / f"{name}_overlay.jpg", overlay_jpeg(pixels, mask))
            done.append((name, path_of[name]))
        pending.clear()

    for name, path in tqdm(list(zip(names, images)), desc="predict", unit="image"):
        try:
            pixels = read_rgb(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            tqdm.write(f"error: cannot read image {path} ({reason})", file=sys.stderr)
            failed.append(path)
            continue
        if pending and (len(pending) == batch_size or pending[0][1].shape != pixels.shape):
            flush()
        pending.append((name, pixels, normalize(pixels)))
    if pending:
        flush()
    if cfg.seg.largest_component:
        post_process(done, out, cfg.data.volume_pattern, args.overlay)
    seconds = time.perf_counter() - started
    written = len(images) - len(failed)
    print(f"predict: {written} images in {seconds:.1f} s ({written / max(seconds, 1e-9):.2f} images/s) "
          f"on {device.type}, batch {batch_size}; masks in {out}"
          + (f"; {len(failed)} unreadable (named above)" if failed else ""))
    return 1 if failed else 0


def post_process(done: list[tuple[str, Path]], out: Path, volume_pattern: str | None, overlay: bool) -> None:
    """The written masks with each class's largest component kept, as the seg stage scored them:
    per volume where the recorded ``data.volume_pattern`` matches the name, else per image."""
    volume_of = functools.partial(volume_and_order, re.compile(volume_pattern)) if volume_pattern else None
    masks = {name: load_mask(out / f"{name}.png") for name, _ in done}
    processed = keep_largest_components(masks, volume_of)
    for name, path in done:
        save_mask(out / f"{name}.png", processed[name])
        if overlay:
            atomic_write_bytes(out / f"{name}_overlay.jpg", overlay_jpeg(read_rgb(path), processed[name]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
