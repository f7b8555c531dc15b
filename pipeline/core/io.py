"""Atomic file output and the VOC mask format.

Everything the pipeline writes goes through these functions: the bytes land in a
temporary file in the destination folder and are renamed into place, so a killed
process never leaves a truncated file under its final name.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Content digests already computed, by (path, file identity): a run plans every stage, and each
# stage fingerprints the same files; data.FileChecks saves them for the next run.
_DIGESTS: dict[tuple, str] = {}


def file_identity(path: Path) -> tuple[int, int, int, int]:
    """(size, mtime, ctime, inode): what changes when a file's bytes may have changed. The
    change time and inode catch a file replaced with its old size and modification time
    preserved (``cp -p``, ``rsync -a``), which size and mtime alone would miss."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def file_digest(path: Path) -> str:
    """Hash of a file's bytes. Cache keys use contents, not mtimes: copying or re-syncing a
    data folder (new mtimes, same bytes) must not make every cached stage stale."""
    memo_key = (os.path.abspath(path),) + file_identity(path)
    if memo_key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[memo_key] = hashlib.file_digest(f, "blake2b").hexdigest()[:32]
    return _DIGESTS[memo_key]


def remember_digests(entries: list) -> None:
    """Adds saved [path, size, mtime, ctime, inode, digest] records to the digest memo."""
    for *key, digest in entries:
        _DIGESTS.setdefault(tuple(key), digest)


def known_digests() -> list:
    return [list(key) + [digest] for key, digest in _DIGESTS.items()]


_UMASK = os.umask(0)


os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def voc_palette() -> list[int]:
    """The 256-colour PASCAL VOC palette (index 255, 'unsure', is (224, 224, 192))."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def mask_png_bytes(mask: np.ndarray) -> bytes:
    """A uint8 class-index mask as a palette PNG, readable as indices by any VOC tool."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"a mask must be a 2-D uint8 array, got {mask.dtype} {mask.shape}")
    image = Image.fromarray(mask, mode="P")
    image.putpalette(voc_palette())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_mask(path: str | Path, mask: np.ndarray) -> None:
    atomic_write_bytes(path, mask_png_bytes(mask))


def load_mask(path: str | Path) -> np.ndarray:
    """Class indices of a palette or grayscale PNG mask (never colour-converted)."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"{path}: a mask must be a palette or grayscale PNG of class indices, "
                             f"got mode {image.mode}")
        return np.array(image, dtype=np.uint8)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any image PIL opens as H x W x 3 uint8, as the networks see it:

    * the EXIF orientation is applied (a phone photo stored sideways comes out upright);
    * 8-bit greyscale is replicated to three channels, palette images take their colours,
      an alpha channel is dropped (the stored colour of a transparent pixel is kept);
    * 16-bit and 32-bit greyscale (medical PNG/TIFF) is stretched linearly from its own
      minimum and maximum to 0..255: such files rarely use their full range (12-bit data in
      16-bit files), and a fixed division by 257 would leave them nearly black.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return np.repeat(np.round(scaled).astype(np.uint8)[..., None], 3, axis=2)
    return np.array(image.convert("RGB"))


def read_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return to_rgb(image)


def save_arrays(path: str | Path, **arrays: np.ndarray) -> None:
    """A compressed .npz of plain arrays (no pickled objects), written atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
