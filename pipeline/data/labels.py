"""Image ids and image-level labels from files a user writes by hand.

* Split files (``ImageSets/Segmentation/<split>.txt``): one id per line.
* Tags files (``data.tags``): the classes in each image, by name.

  - CSV with the header ``id,tags``; the tags field lists class names separated by ``;``
    when it contains one (so a name may hold a space: ``potted plant;dog``), else by
    whitespace (``cat dog``); an empty field means no object in the image.
  - JSON: an object ``{"<id>": ["cat", "dog"], ...}``.

  A name must be one of ``classes.txt``; the background's name (line 1) is accepted and
  means nothing (every image has background).
* IRNet's ``cls_labels.npy`` (``data.image_labels``): a pickled dict, loaded only with
  ``data.allow_pickle: true`` because unpickling runs code.

Every id must be a plain file name (no ``/``, ``\\``, ``..``): ids become file names in
the run folder, and a crafted id would write outside it. Every problem is a one-line
:class:`DataError` naming the file and line.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import re
from pathlib import Path

import numpy as np

from pipeline.core.errors import DataError

# An id becomes <id>.npz and a temporary .<id>.npz.XXXXXXXX.tmp: file names stop at 255 bytes.
MAX_ID_BYTES = 200


def check_id(image_id: str, where: str) -> str:
    """``image_id`` if it is a plain file name, else a DataError naming ``where`` it came from."""
    if (not image_id or image_id in (".", "..") or "/" in image_id or "\\" in image_id or "\0" in image_id
            or image_id != image_id.strip()):
        raise DataError(f"{where}: id {image_id!r} is not a plain file name (ids become file names in "
                        "the run folder: no '/', '\\', '..' or surrounding spaces)")
    if len(image_id.encode()) > MAX_ID_BYTES:
        raise DataError(f"{where}: id {image_id[:40]!r}... is longer than {MAX_ID_BYTES} bytes")
    return image_id


def read_text(path: Path, what: str) -> str:
    """A hand-written text file as UTF-8 (a leading byte-order mark, as Windows editors write
    it, is dropped); another encoding is a one-line DataError."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text ({what}); save it as UTF-8") from None


def read_id_lines(path: Path) -> list[str]:
    """The ids of a split or id-list file, one per line (blank lines skipped), each a plain
    file name and listed once."""
    ids, seen = [], {}
    for number, line in enumerate(read_text(path, "one id per line").splitlines(), start=1):
        image_id = line.strip()
        if not image_id:
            continue
        check_id(image_id, f"{path} line {number}")
        if image_id in seen:
            raise DataError(f"{path} line {number}: id {image_id!r} is listed twice "
                            f"(first on line {seen[image_id]})")
        seen[image_id] = number
        ids.append(image_id)
    return ids


def read_tags(path: Path, classes: list[str]) -> dict[str, np.ndarray]:
    """Id -> sorted foreground class indices (1..C-1), in the file's order (it is the train
    split's order when the data folder has no split files)."""
    if not path.is_file():
        raise DataError(f"tags file {path} does not exist (config key data.tags)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(path)
    elif suffix == ".json":
        rows = _json_rows(path)
    else:
        hint = " (IRNet's cls_labels.npy goes in data.image_labels)" if suffix == ".npy" else ""
        raise DataError(f"tags file {path} must be .csv or .json{hint}")
    index = {name: i for i, name in enumerate(classes)}
    tags, first_line = {}, {}
    for where, line, image_id, field in rows:
        check_id(image_id, where)
        # A field that is one class name is that class, spaces and all ("potted plant").
        if isinstance(field, list):
            names = field
        else:
            names = [field.strip()] if field.strip() in index else split_tags(field)
        if image_id in first_line:
            raise DataError(f"{where}: id {image_id!r} is listed twice "
                            f"(first on line {first_line[image_id]})")
        first_line[image_id] = line
        unknown = [name for name in names if name not in index]
        if unknown:
            raise DataError(f"{where}: unknown class {unknown[0]!r}; classes.txt names: {', '.join(classes)}")
        tags[image_id] = np.array(sorted({index[name] for name in names} - {0}), dtype=np.int64)
    if not tags:
        raise DataError(f"tags file {path} lists no images")
    return tags


def split_tags(field: str) -> list[str]:
    parts = field.split(";") if ";" in field else field.split()
    return [part.strip() for part in parts if part.strip()]


def _csv_rows(path: Path):
    reader = csv.reader(io.StringIO(read_text(path, "a CSV tags file")))
    try:
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header] != ["id", "tags"]:
            raise DataError(f"{path} line 1: the header must be 'id,tags', got {','.join(header or [])!r}")
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise DataError(f"{where}: expected 2 fields (id,tags), got {len(row)}; "
                                "quote a tags field that contains commas")
            yield where, reader.line_num, row[0].strip(), row[1]
    except csv.Error as error:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({error})") from None


def _json_rows(path: Path):
    text = read_text(path, "a JSON tags file")
    try:
        table = json.loads(text, object_pairs_hook=functools.partial(_unique_keys, path=path, text=text))
    except json.JSONDecodeError as error:
        raise DataError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(table, dict):
        raise DataError(f"{path}: the top level must be an object {{id: [class names]}}")
    for image_id, names in table.items():
        line = _json_key_line(text, image_id)
        where = f"{path} line {line}"
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise DataError(f"{where}: the tags of {image_id!r} must be a list of class names, got {names!r}")
        yield where, line, image_id, [name.strip() for name in names]


def _unique_keys(pairs: list, path: Path, text: str) -> dict:
    """json.loads keeps the last of two equal keys silently; an id listed twice is an error."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise DataError(f"{path} line {_json_key_line(text, key, 2)}: id {key!r} is listed twice "
                            f"(first on line {_json_key_line(text, key)})")
        seen[key] = value
    return seen


def _json_key_line(text: str, key: str, occurrence: int = 1) -> int:
    """Line of the ``occurrence``-th ``"key":`` in the JSON text (json.loads keeps no positions)."""
    matches = list(re.finditer(re.escape(json.dumps(key)) + r"\s*:", text))
    match = matches[occurrence - 1] if len(matches) >= occurrence else None
    return text.count("\n", 0, match.start()) + 1 if match else 1


def read_cls_labels(path: Path, num_classes: int, allow_pickle: bool) -> dict[str, np.ndarray]:
    """IRNet's cls_labels.npy: a pickled dict from id to a multi-hot vector over the C-1
    foreground classes, keyed by id or, as IRNet does for VOC, by the id as an integer
    (2007_000032 -> 2007000032)."""
    if not path.is_file():
        raise DataError(f"image label file {path} does not exist (config key data.image_labels)")
    if not allow_pickle:
        raise DataError(f"{path} is a pickle, and loading a pickle can run code: set data.allow_pickle: true "
                        "if you trust the file, or give the labels as a CSV or JSON tags file (data.tags)")
    try:
        table = np.load(path, allow_pickle=True).item()
        labels = {}
        for key, vector in table.items():
            vector = np.asarray(vector).ravel()
            if vector.size != num_classes - 1:
                raise DataError(f"{path}: labels of {key!r} have {vector.size} entries, "
                                f"expected {num_classes - 1} (one per foreground class)")
            labels[str(key)] = np.flatnonzero(vector > 0.5).astype(np.int64) + 1
        return labels
    except (ValueError, OSError, AttributeError, EOFError) as error:
        raise DataError(f"{path} is not a cls_labels.npy dict of multi-hot vectors "
                        f"({type(error).__name__})") from None
