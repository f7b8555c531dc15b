"""A user's own folder: tags instead of masks, any image format, bad data caught before work,
segmenting new images with a finished run, and the run report."""
import json
import re
import shutil

import numpy as np
import pytest
from conftest import DEMO_CONFIG, TINY, run, two_object_mask, write_voc_folder
from PIL import Image
from scipy import ndimage

from pipeline.core.config_file import load_config
from pipeline.core.errors import DataError
from pipeline.core.io import load_arrays, load_mask, read_rgb
from pipeline.data.checks import FileChecks
from pipeline.data.dataset import VOCDataset
from pipeline.data.labels import read_tags
from pipeline.data.prepare import prepare_data
from run_pipeline import main

CLASSES = ["background", "cat", "dog", "potted plant"]


# --- tags files ----------------------------------------------------------------------------

def test_csv_tags_by_name_with_spaces_semicolons_and_empty_fields(tmp_path):
    path = tmp_path / "tags.csv"
    path.write_text("id,tags\na,cat dog\nb,potted plant;cat\nc,\nd,background\n")
    tags = read_tags(path, CLASSES)
    assert list(tags) == ["a", "b", "c", "d"]  # the file's order
    assert tags["a"].tolist() == [1, 2] and tags["b"].tolist() == [1, 3]
    assert tags["c"].size == 0 and tags["d"].size == 0  # nothing, and the background alone


def test_json_tags(tmp_path):
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"x": ["dog", "cat"], "y": []}, indent=1))
    tags = read_tags(path, CLASSES)
    assert tags["x"].tolist() == [1, 2] and tags["y"].size == 0


@pytest.mark.parametrize("name, text, message", [
    ("tags.csv", "id,tags\na,cat\nb,cat dgo\n",
     r"tags.csv line 3: unknown class 'dgo'; classes.txt names: background, cat"),
    ("tags.csv", "id,tags\na,cat\na,dog\n", r"tags.csv line 3: id 'a' is listed twice \(first on line 2\)"),
    ("tags.csv", "id,tags\n../evil,cat\n", r"tags.csv line 2: id '../evil' is not a plain file name"),
    ("tags.csv", "image,labels\na,cat\n", r"tags.csv line 1: the header must be 'id,tags'"),
    ("tags.csv", "id,tags\na,cat,dog\n", r"tags.csv line 2: expected 2 fields"),
    ("tags.json", '{\n "a": ["cat"],\n "b": ["bird"]\n}', r"tags.json line 3: unknown class 'bird'"),
    ("tags.json", '{"a": "cat"}', r"tags.json line 1: the tags of 'a' must be a list"),
    ("tags.json", '{"a": [}', r"tags.json line 1: not valid JSON"),
    ("tags.txt", "a cat", r"must be .csv or .json"),
    ("tags.json", '{\n "a": ["cat"],\n "a": ["dog"]\n}',
     r"tags.json line 3: id 'a' is listed twice \(first on line 2\)"),
])
def test_bad_tags_files_are_one_line_errors_naming_the_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_tags(path, CLASSES)


def test_tags_files_from_spreadsheets_and_editors(tmp_path):
    path = tmp_path / "tags.csv"
    # A byte-order mark; a name with a space.
    path.write_bytes("\ufeffid,tags\na,potted plant\nb,cat\n".encode())
    tags = read_tags(path, CLASSES)
    assert tags["a"].tolist() == [3] and tags["b"].tolist() == [1]
    path.write_bytes(b"id,tags\na,cat\nb,caf\xe9\n")  # cp1252, not UTF-8
    with pytest.raises(DataError, match=r"tags.csv line 3: not UTF-8 text"):
        read_tags(path, CLASSES)


# --- images ------------------------------------------------------------------------------

def test_every_image_kind_loads_as_upright_three_channel_8_bit(tmp_path):
    ramp = np.arange(12 * 20, dtype=np.uint16).reshape(12, 20)
    Image.fromarray(ramp * 100).save(tmp_path / "deep.png")  # 16-bit grey, 0..23900 of 65535
    deep = read_rgb(tmp_path / "deep.png")
    assert deep.shape == (12, 20, 3) and deep.dtype == np.uint8
    assert deep[0, 0, 0] == 0 and deep[-1, -1, 0] == 255  # stretched from its own range
    assert (deep[..., 0] == deep[..., 2]).all()

    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    assert read_rgb(tmp_path / "alpha.png")[0, 0].tolist() == [200, 0, 0]

    palette = Image.fromarray(np.full((5, 5), 1, np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert read_rgb(tmp_path / "palette.png")[2, 2].tolist() == [10, 20, 30]

    colour = np.zeros((10, 30, 3), np.uint8)
    colour[:, :15] = [250, 0, 0]  # red left half, blue right half
    colour[:, 15:] = [0, 0, 250]
    for suffix in ("bmp", "tif"):
        Image.fromarray(colour).save(tmp_path / f"plain.{suffix}")
        np.testing.assert_array_equal(read_rgb(tmp_path / f"plain.{suffix}"), colour)

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.fromarray(colour).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = read_rgb(tmp_path / "phone.jpg")
    assert upright.shape == (30, 10, 3)  # rotated: the red half is now on top
    assert upright[2, 5, 0] > 200 and upright[-3, 5, 2] > 200


def test_a_data_set_with_exif_rotated_jpegs_checks_masks_against_the_upright_size(tmp_path):
    root = write_voc_folder(tmp_path / "voc", {"a": np.zeros((30, 10), np.uint8)})
    (root / "JPEGImages" / "a.png").unlink()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((10, 30, 3), np.uint8)).save(root / "JPEGImages" / "a.JPG", exif=exif)
    dataset = VOCDataset(root)
    dataset.validate("train", ["val"])
    assert dataset.image_size("a") == (10, 30) and dataset.load_image("a").shape == (30, 10, 3)


# --- folders without masks or split files ------------------------------------------------

def _tags_only_folder(tmp_path, with_splits: bool):
    masks = {f"t{i}": two_object_mask(cls_b=1 + i % 2) for i in range(4)}
    root = write_voc_folder(tmp_path / "own", masks)
    shutil.rmtree(root / "SegmentationClass")
    if not with_splits:
        shutil.rmtree(root / "ImageSets")
    rows = "".join(f"t{i},cat {'dog' if i % 2 else ''}\n" for i in range(4))
    (root / "tags.csv").write_text("id,tags\n" + rows)
    return root


def test_without_split_files_the_tags_file_lists_the_train_split_and_there_is_no_val(tmp_path):
    root = _tags_only_folder(tmp_path, with_splits=False)
    cfg = load_config(DEMO_CONFIG, ["demo=null", f"data.root={root}", "data.tags=tags.csv",
                                    "cam.train.batch_size=2", "seg.train.batch_size=2"])
    dataset = prepare_data(cfg)
    assert dataset.split_ids("train") == ["t0", "t1", "t2", "t3"] and dataset.split_ids("val") == []
    assert dataset.image_labels("t1").tolist() == [1, 2] and dataset.image_labels("t0").tolist() == [1]


def test_without_tags_or_masks_the_error_says_what_to_give(tmp_path):
    root = _tags_only_folder(tmp_path, with_splits=True)
    with pytest.raises(DataError, match="id 't0' has no mask .*: weak mode reads its image labels from it "
                                        "unless a tags file gives every train image's tags"):
        prepare_data(load_config(DEMO_CONFIG, ["demo=null", f"data.root={root}"]))
    shutil.rmtree(root / "ImageSets")
    with pytest.raises(DataError, match="no ImageSets/Segmentation/ and no tags file"):
        prepare_data(load_config(DEMO_CONFIG, ["demo=null", f"data.root={root}"]))


def test_a_tags_id_with_its_file_extension_gets_a_hint(tmp_path):
    root = _tags_only_folder(tmp_path, with_splits=False)
    (root / "tags.csv").write_text("id,tags\nt0.png,cat\n")
    cfg = load_config(DEMO_CONFIG, ["demo=null", f"data.root={root}", "data.tags=tags.csv",
                                    "cam.train.batch_size=2", "seg.train.batch_size=2"])
    with pytest.raises(DataError,
                       match="id 't0.png' has no image .*; ids are file names without their extension"):
        prepare_data(cfg)


def test_full_and_mixed_modes_name_the_masks_they_are_missing(tmp_path, capsys):
    root = _tags_only_folder(tmp_path, with_splits=True)
    (root / "SegmentationClass").mkdir()
    Image.fromarray(two_object_mask(), mode="L").save(root / "SegmentationClass" / "t2.png")
    common = ["--config", DEMO_CONFIG, "--run-dir", str(tmp_path / "run"), "--set", "demo=null",
              "--set", f"data.root={root}", "--set", "data.tags=tags.csv",
              "--set", "seg.train.batch_size=2", "--set", "cam.train.batch_size=2"]
    assert main(common + ["--mode", "full"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert "--mode full trains on masks, but 3 of the 4 images it trains on have none" in error
    assert "t0, t1, t3" in error
    full_list = _id_list(tmp_path, "t1")
    assert main(common + ["--mode", "mixed", "--set", f"mixed.full_list={full_list}"]) == 2
    assert "--mode mixed trains on masks, but 1 of the 1 images" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _id_list(tmp_path, *ids):
    path = tmp_path / "ids.txt"
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


# --- bad data in a real folder: one line, exit 2, nothing written -------------------------

def _bad_demo(tmp_path, damage):
    """The tiny demo, copied and damaged; returns the CLI arguments that run on the copy."""
    assert run(tmp_path, "--dry-run") == 0  # generates the demo data only
    root = tmp_path / "copy"
    shutil.copytree(tmp_path / "demo", root)
    (root / "demo.json").unlink()
    damage(root)
    return ["--set", "demo=null", "--set", f"data.root={root}", "--run-dir", str(tmp_path / "bad-run")]


def _first_train_id(root):
    return (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "ImageSets/Segmentation/train.txt").write_text(
        "../../escape\n" + (root / "ImageSets/Segmentation/train.txt").read_text()),
     r"train.txt line 1: id '../../escape' is not a plain file name"),
    (lambda root: (root / "ImageSets/Segmentation/val.txt").write_text(
        "/etc/passwd\n"), r"val.txt line 1: id '/etc/passwd' is not a plain file name"),
    (lambda root: (root / "ImageSets/Segmentation/train.txt").write_text(
        (root / "ImageSets/Segmentation/train.txt").read_text() + _first_train_id(root) + "\n"),
     r"train.txt line 25: id '\w+' is listed twice \(first on line 1\)"),
    (lambda root: _truncate(root / "JPEGImages" / f"{_first_train_id(root)}.jpg"),
     r"image .*train_0000\.jpg cannot be decoded \(image file is truncated"),
])
def test_bad_data_stops_before_any_stage_with_one_line_and_writes_nothing(tmp_path, capsys, damage, message):
    args = _bad_demo(tmp_path, damage)
    capsys.readouterr()
    assert run(tmp_path, *args) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("error: ") and re.search(message, error), error
    assert not (tmp_path / "bad-run").exists()


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_jpeg_is_caught_although_its_header_reads(tmp_path):
    root = write_voc_folder(tmp_path / "voc", {"a": two_object_mask()})
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "JPEGImages" / "a.jpg", quality=95)
    (root / "JPEGImages" / "a.png").unlink()
    _truncate(root / "JPEGImages" / "a.jpg")
    with Image.open(root / "JPEGImages" / "a.jpg") as image:
        assert image.size == (32, 32)  # the header alone looks fine
    with pytest.raises(DataError, match=r"a.jpg cannot be decoded \(image file is truncated"):
        VOCDataset(root).validate("train", ["val"])


def test_checked_files_are_not_decoded_again_until_they_change(tmp_path):
    masks = {f"m{i}": two_object_mask() for i in range(5)}
    splits = {"train": list(masks)[:3], "val": list(masks)[3:]}
    root = write_voc_folder(tmp_path / "voc", masks, splits=splits)
    cfg = load_config(DEMO_CONFIG, ["demo=null", f"data.root={root}", "cam.train.batch_size=2",
                                    "seg.train.batch_size=2"])
    memo = tmp_path / "run" / "checked_files.json"
    first = FileChecks(memo)
    prepare_data(cfg, first)
    assert (first.hits, first.misses) == (0, 10)  # 5 images, 5 masks
    first.save()
    second = FileChecks(memo)
    prepare_data(cfg, second)
    assert (second.hits, second.misses) == (10, 0)
    changed = two_object_mask()
    changed[0, 0] = 9  # beyond classes.txt: must be found, not remembered as fine
    Image.fromarray(changed, mode="L").save(root / "SegmentationClass" / "m1.png")
    third = FileChecks(memo)
    with pytest.raises(DataError, match="m1.png has class index 9"):
        prepare_data(cfg, third)


# --- the honest test that no ground truth leaks into weak training -------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny demo's weak run on its own folder, and on a copy without the train masks
    (a tags file written from them instead)."""
    tmp_path = tmp_path_factory.mktemp("own")
    assert run(tmp_path) == 0
    demo, copy = tmp_path / "demo", tmp_path / "tags-only"
    shutil.copytree(demo, copy)
    (copy / "demo.json").unlink()
    classes = (demo / "classes.txt").read_text().split()
    rows = []
    for image_id in (demo / "ImageSets" / "Segmentation" / "train.txt").read_text().split():
        present = np.unique(load_mask(copy / "SegmentationClass" / f"{image_id}.png"))
        rows.append(f"{image_id},{' '.join(classes[k] for k in present if 0 < k < 255)}\n")
        (copy / "SegmentationClass" / f"{image_id}.png").unlink()
    (copy / "tags.csv").write_text("id,tags\n" + "".join(rows))
    assert run(tmp_path, "--set", "demo=null", "--set", f"data.root={copy}", "--set", "data.tags=tags.csv",
               "--run-dir", str(tmp_path / "tags-run")) == 0
    return tmp_path


@pytest.mark.e2e
def test_weak_run_without_train_masks_is_bit_identical(runs):
    original, tags_only = runs / "run", runs / "tags-run"
    cams = sorted((original / "cam" / "cams").glob("*.npz"))
    assert len(cams) == 24
    for path in cams:
        a, b = load_arrays(path), load_arrays(tags_only / "cam" / "cams" / path.name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for folder in ("refine/pseudo", "seg/predictions"):
        files = sorted((original / folder).glob("*.png"))
        assert files and all((tags_only / folder / f.name).read_bytes() == f.read_bytes() for f in files)
    assert (tags_only / "cam" / "model.pt").read_bytes() == (original / "cam" / "model.pt").read_bytes()
    for stage in ("cam", "refine"):
        metrics = json.loads((tags_only / stage / "metrics.json").read_text())
        assert metrics["miou"] is None and metrics["not_scored"] == "no masks"
    seg_a, seg_b = (json.loads((d / "seg" / "metrics.json").read_text()) for d in (original, tags_only))
    assert seg_b["miou"] == seg_a["miou"] and seg_b["scored_images"] == 8


# --- predict -----------------------------------------------------------------------------

@pytest.mark.e2e
def test_predict_on_the_val_images_reproduces_the_seg_stage(runs, capsys):
    run_dir, demo = runs / "run", runs / "demo"
    val_ids = (demo / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    listing = runs / "val-images.txt"
    listing.write_text("".join(f"demo/JPEGImages/{i}.jpg\n" for i in val_ids))
    out = runs / "predicted"
    assert main(["predict", "--run-dir", str(run_dir), "--images", str(listing), "--out", str(out),
                 "--overlay"]) == 0
    summary = capsys.readouterr().out
    assert re.search(r"predict: 8 images in [\d.]+ s \([\d.]+ images/s\)", summary)
    for image_id in val_ids:
        np.testing.assert_array_equal(load_mask(out / f"{image_id}.png"),
                                      load_mask(run_dir / "seg" / "predictions" / f"{image_id}.png"))
        with (Image.open(out / f"{image_id}_overlay.jpg") as overlay,
              Image.open(demo / "JPEGImages" / f"{image_id}.jpg") as image):
            assert overlay.format == "JPEG" and overlay.size == image.size


@pytest.mark.e2e
def test_predict_follows_a_seg_stage_that_predicts_through_the_crf(runs, capsys):
    run_dir, demo = runs / "run-crf", runs / "demo"
    shutil.copytree(runs / "run", run_dir)
    assert run(runs, "--run-dir", str(run_dir), "--set", "seg.crf_predict=true") == 0  # rescored only
    out = runs / "predicted-crf"
    assert main(["predict", "--run-dir", str(run_dir), "--images", str(demo / "JPEGImages"),
                 "--out", str(out)]) == 0
    predictions = sorted((run_dir / "seg" / "predictions").glob("*.png"))
    assert len(predictions) == 8
    assert all(np.array_equal(load_mask(out / p.name), load_mask(p)) for p in predictions)
    # The tiny run's network predicts too little for the CRF to move (tests/test_crf.py shows it
    # moving a boundary); the manifest records what the predictions went through.
    scoring = json.loads((run_dir / "seg" / "manifest.json").read_text())["inputs"]["scoring"]["config"]
    assert scoring["seg.crf_predict"] is True and scoring["refine.crf"]["bilateral_sxy"] == 20


@pytest.mark.e2e
def test_largest_component_rescores_and_predict_post_processes_as_the_seg_stage(runs, capsys):
    run_dir, demo = runs / "run-largest", runs / "demo"
    shutil.copytree(runs / "run", run_dir)
    assert run(runs, "--run-dir", str(run_dir), "--set", "seg.largest_component=true") == 0
    before, after = (json.loads((d / "seg" / "metrics.json").read_text()) for d in (runs / "run", run_dir))
    assert after["train_loss_by_epoch"] == before["train_loss_by_epoch"]  # rescored: not trained again
    assert json.loads((run_dir / "seg" / "manifest.json").read_text())["inputs"]["scoring"]["config"][
        "seg.largest_component"] is True
    out = runs / "predicted-largest"
    assert main(["predict", "--run-dir", str(run_dir), "--images", str(demo / "JPEGImages"),
                 "--out", str(out), "--overlay"]) == 0
    predictions = sorted((run_dir / "seg" / "predictions").glob("*.png"))
    assert len(predictions) == 8
    for path in predictions:
        mask = load_mask(path)
        assert np.array_equal(load_mask(out / path.name), mask)
        for value in set(np.unique(mask)) - {0}:
            assert ndimage.label(mask == value)[1] == 1  # the demo has no volumes: one blob per image
        assert (out / f"{path.stem}_overlay.jpg").is_file()


@pytest.mark.e2e
def test_predict_names_unreadable_images_and_still_writes_the_others(runs, capsys):
    images = runs / "mixed-bag"
    images.mkdir()
    for name in ("one", "two"):
        shutil.copy(next((runs / "demo" / "JPEGImages").glob("*.jpg")), images / f"{name}.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = runs / "mixed-bag-out"
    assert main(["predict", "--run-dir", str(runs / "run"), "--images", str(images), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "error: cannot read image" in captured.err and "broken.jpg" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["one.png", "two.png"]
    assert "1 unreadable" in captured.out


@pytest.mark.e2e
def test_predict_refuses_a_run_without_seg_and_an_output_folder_that_is_the_input(runs, capsys):
    images = runs / "demo" / "JPEGImages"

    def predict(run_dir, out):
        return main(["predict", "--run-dir", str(run_dir), "--images", str(images), "--out", str(out)])

    assert predict(runs / "nothing", runs / "o") == 2
    assert "has no finished seg stage" in capsys.readouterr().err
    assert predict(runs / "run", images) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "is the folder of the input image" in error
    inside = runs / "run" / "seg" / "predictions"
    before = sorted(p.name for p in inside.iterdir())
    for out in (inside, runs / "run" / "report", runs / "run"):
        assert predict(runs / "run", out) == 2
        assert "one of the folders a run rewrites" in capsys.readouterr().err
    assert sorted(p.name for p in inside.iterdir()) == before


@pytest.mark.e2e
def test_a_tags_only_folder_without_splits_trains_then_predicts(runs, tmp_path):
    root = _tags_only_folder(tmp_path, with_splits=False)
    run_dir = tmp_path / "run"
    common = ["--config", DEMO_CONFIG, "--run-dir", str(run_dir), "--set", "demo=null",
              "--set", f"data.root={root}", "--set", "data.tags=tags.csv"]
    common += sum((["--set", s] for s in TINY if not s.startswith("demo.")), [])
    common += ["--set", "cam.train.batch_size=2", "--set", "seg.train.batch_size=2"]
    assert main(common) == 0
    metrics = json.loads((run_dir / "seg" / "metrics.json").read_text())
    assert metrics["miou"] is None and metrics["not_scored"] == "no val split"
    assert not (run_dir / "seg" / "predictions").exists()
    assert main(["predict", "--run-dir", str(run_dir), "--images", str(root / "JPEGImages"),
                 "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 4


# --- the report --------------------------------------------------------------------------

@pytest.mark.e2e
def test_the_report_links_only_files_that_exist_and_names_every_class(runs):
    run_dir = runs / "run"
    page = (run_dir / "report.html").read_text()
    links = re.findall(r'src="([^"]+)"', page)
    assert len(links) > 10
    assert all(not link.startswith(("/", "http")) and (run_dir / link).is_file() for link in links)
    for name in (runs / "demo" / "classes.txt").read_text().split():
        assert name in page
    assert "report/scores.png" in links and "report/losses.png" in links
    assert "worst scored" in page


@pytest.mark.e2e
def test_report_command_rebuilds_the_page(runs, capsys):
    run_dir = runs / "tags-run"
    (run_dir / "report.html").unlink()
    assert main(["report", "--run-dir", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert "not scored (no masks)" in page
    assert main(["report", "--run-dir", str(runs / "nothing")]) == 2
