"""The tools a user runs on their own runs (tools/), on tiny data made here: what each prints,
and one ``error:`` line with exit status 2 on bad input. The tools that need a finished run
(score_seg_on_train, refine_montage) are tested in test_pipeline.py, on its tiny runs."""
import numpy as np
import pytest
import torch
from conftest import DEMO_CONFIG, ROOT, TINY, run, write_voc_folder

from pipeline.core.config_file import load_config
from pipeline.core.io import save_mask
from pipeline.core.metrics import confusion_matrix, iou_scores
from pipeline.data.dataset import open_dataset, score_ids
from pipeline.data.training_set import normalize
from pipeline.methods.cams import cam_to_label, multiscale_cams
from pipeline.models.networks import CAMNet
from tools import exit_cams, mask_errors, stray_pixels


def one_error_line(capsys) -> str:
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    return error


def test_stray_pixels_counts_predictions_far_from_the_true_class(tmp_path, capsys):
    truth = np.zeros((40, 40), np.uint8)
    truth[5:10, 5:10] = 1  # a cat in a corner
    write_voc_folder(tmp_path / "data", {"a": truth})
    predicted = truth.copy()
    predicted[35:37, 35:38] = 1  # 6 pixels far from it
    predicted[10, 5:10] = 1  # 5 pixels next to it
    (tmp_path / "pred").mkdir()
    save_mask(tmp_path / "pred" / "a.png", predicted)
    command = ["--data-root", str(tmp_path / "data"), "--predictions", str(tmp_path / "pred")]
    assert stray_pixels.main(command + ["--class", "cat"]) == 0
    assert ("6 of 36 predicted cat pixels (16.67%) lie more than 20 px from the true cat, in 1 images"
            in capsys.readouterr().out)
    assert stray_pixels.main(command + ["--class", "cat", "--distance", "0.5"]) == 0
    assert "11 of 36 predicted cat pixels" in capsys.readouterr().out  # the 5 next to it too

    assert stray_pixels.main(command + ["--class", "heart"]) == 2
    assert one_error_line(capsys).startswith("error: class 'heart' is not in")
    save_mask(tmp_path / "pred" / "a.png", predicted[:30])
    assert stray_pixels.main(command + ["--class", "cat"]) == 2
    assert "a.png is 40x30 px" in one_error_line(capsys)
    assert stray_pixels.main(command[:2] + ["--predictions", str(tmp_path / "none"), "--class", "cat"]) == 2
    assert "is not a folder" in one_error_line(capsys)
    (tmp_path / "data" / "classes.txt").unlink()
    assert stray_pixels.main(command + ["--class", "cat"]) == 2
    assert "classes.txt is missing" in one_error_line(capsys)


def test_mask_errors_splits_the_pixels_by_kind_of_error(tmp_path, capsys):
    truth = np.zeros((10, 10), np.uint8)
    truth[:, :4] = 1  # 40 cat pixels, 60 background
    truth[9, 9] = 255  # not scored
    write_voc_folder(tmp_path / "data", {"a": truth})
    mask = truth.copy()
    mask[:, 4] = 2  # 10 background pixels marked dog
    mask[0, :2] = 0  # 2 cat pixels marked background
    mask[1, :3] = 2  # 3 cat pixels marked dog
    mask[2:4, 6:8] = 255  # 4 unsure background pixels
    mask[5, 0] = 255  # 1 unsure cat pixel: background under the argmax protocol
    (tmp_path / "masks").mkdir()
    save_mask(tmp_path / "masks" / "a.png", mask)
    command = ["--config", DEMO_CONFIG, "--set", f"data.root={tmp_path / 'data'}",
               "--masks", str(tmp_path / "masks")]
    assert mask_errors.main(command) == 0
    assert capsys.readouterr().out.splitlines() == [
        "1 images, 99 scored pixels",
        "background marked as a class: 10.1%",  # 10 of 99
        "class marked as background: 3.0%",  # 2 + 1 unsure
        "class marked as another class: 3.0%",
        "right: 83.8%",  # 99 - 16
        "unsure: 5.1% of the pixels, of which background in the ground truth: 80.0%",
    ]
    assert mask_errors.main(command + ["--class", "cat"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (  # 40 cat pixels: 34 right, 3 dog, 2 bg, 1 unsure
        "cat, 40 true pixels, marked: cat 85.0%, dog 7.5%, background 5.0%, unsure 2.5%")
    assert mask_errors.main(command + ["--class", "horse"]) == 2
    assert "--class horse is not a class" in one_error_line(capsys)
    save_mask(tmp_path / "masks" / "a.png", mask[:, :8])
    assert mask_errors.main(command) == 2
    assert "a.png is 8x10 px, its ground truth 10x10" in one_error_line(capsys)
    (tmp_path / "masks" / "a.png").unlink()
    assert mask_errors.main(command) == 2
    assert one_error_line(capsys).startswith("error: no mask in")
    assert mask_errors.main(command + ["--set", "seed=abc"]) == 2
    assert "seed" in one_error_line(capsys)
    assert mask_errors.main(command[:-1] + [str(tmp_path / "none")]) == 2
    assert "is not a folder" in one_error_line(capsys)


def test_exit_cams_scores_the_main_exit_as_the_cam_stage_scores_its_cams(tmp_path, capsys):
    """Its main-exit row is the stage's scoring of CAMs at scale 1 with the mirror; a state
    without the exits, or SR off, is a one-line error. On the tiny demo's data, an untrained
    network."""
    assert run(tmp_path, "--dry-run") == 0  # generates the tiny demo data only
    capsys.readouterr()
    overrides = TINY + [f"data.root={tmp_path / 'demo'}", "num_threads=1", "cam.sr.enabled=true",
                        "cam.sr.head_channels=8", "cam.sr.exit_classifier=pooled"]
    cfg = load_config(DEMO_CONFIG, overrides)
    dataset = open_dataset(cfg.data)
    torch.manual_seed(0)
    model = CAMNet(cfg.cam.backbone, dataset.num_classes - 1, cfg.cam.sr).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "state.pt")
    ids = sorted(score_ids(cfg.data, dataset))[:6]
    confusion = 0
    with torch.no_grad():
        for image_id in ids:
            classes = dataset.image_labels(image_id)
            cams = multiscale_cams(model, normalize(dataset.load_image(image_id)), classes, [1.0], True)
            labels = cam_to_label(cams, classes, 0.5)
            confusion = confusion + confusion_matrix(dataset.load_mask(image_id), labels, dataset.num_classes)
    expected = iou_scores(confusion, dataset.classes)["miou"]

    command = ["--config", DEMO_CONFIG, "--state", str(tmp_path / "state.pt"), "--images", "6"]
    command += [arg for item in overrides for arg in ("--set", item)]
    assert exit_cams.main(command) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert list(rows)[2:7] == ["stem", "layer1", "layer2", "layer3", "main"]
    assert rows["main"][3] == f"{100 * expected:.1f}"  # the mIoU at background threshold 0.5
    assert "Operation II's hard target (stem pixels" in out

    # Max-fusion marks at 0.5 every pixel that any of its maps marks: never less of the image.
    assert exit_cams.main(command + ["--fuse", "layer3", "--fuse", "layer2"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    names = ("main", "layer2", "layer3", "main+layer3+layer2")
    marked = {name: float(rows[name][4].rstrip("%")) for name in names}
    assert marked["main+layer3+layer2"] >= max(marked["main"], marked["layer2"], marked["layer3"])
    assert exit_cams.main(command + ["--fuse", "head"]) == 2
    assert "--fuse head: not one of cam.sr.exits" in one_error_line(capsys)

    plain = CAMNet(cfg.cam.backbone, dataset.num_classes - 1)
    torch.save({"model": plain.state_dict()}, tmp_path / "plain.pt")
    command[command.index(str(tmp_path / "state.pt"))] = str(tmp_path / "plain.pt")
    assert exit_cams.main(command) == 2
    assert "does not match the config's network" in one_error_line(capsys)
    assert exit_cams.main(command + ["--set", "cam.sr.enabled=false"]) == 2
    assert "the exits exist only with SR on" in one_error_line(capsys)
    command[command.index(str(tmp_path / "plain.pt"))] = str(tmp_path / "none.pt")
    assert exit_cams.main(command) == 2
    assert "none.pt does not exist" in one_error_line(capsys)


@pytest.mark.parametrize("tool", ["mask_errors", "stray_pixels", "refine_montage", "exit_cams",
                                  "score_seg_on_train"])
def test_every_tool_says_what_it_does_and_how_to_run_it(tool):
    """A one-paragraph docstring naming its command line, as ``--help`` shows it."""
    source = (ROOT / "tools" / f"{tool}.py").read_text()
    assert source.startswith("#!/usr/bin/env python\n")
    module = __import__(f"tools.{tool}", fromlist=["main"])
    paragraphs = [p for p in module.__doc__.strip().split("\n\n")]
    assert len(paragraphs) == 2 and f"python tools/{tool}.py" in paragraphs[1], module.__doc__
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
