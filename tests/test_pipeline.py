"""End to end on a tiny demo: real networks, real CRF, real files, one epoch each."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import DEMO_CONFIG, TINY, run

from pipeline.core.config_file import load_config
from pipeline.methods.cams import cam_thresholds, load_cams, max_cam_histogram
from run_pipeline import main


def stage_folders(run_dir):
    return sorted(p.name for p in run_dir.iterdir() if (p / "manifest.json").is_file())


def manifest_time(tmp_path, stage, run_dir=None):
    manifest = (run_dir or tmp_path / "run") / stage / "manifest.json"
    return json.loads(manifest.read_text())["finished_at"], manifest.stat().st_mtime_ns


@pytest.fixture(scope="module")
def weak_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    assert run(tmp_path) == 0
    return tmp_path


@pytest.mark.e2e
def test_weak_run_writes_every_stage_with_scores(weak_run):
    run_dir = weak_run / "run"
    for stage in ("cam", "refine", "seg"):
        metrics = json.loads((run_dir / stage / "metrics.json").read_text())
        assert 0.0 <= metrics["miou"] <= 1.0 and metrics["wall_time_s"] > 0
        assert "per_class_iou" in metrics
    cam_metrics = json.loads((run_dir / "cam" / "metrics.json").read_text())
    assert cam_metrics["best_miou"] >= cam_metrics["miou"]
    assert len(list((run_dir / "cam" / "cams").glob("*.npz"))) == 24
    assert len(list((run_dir / "refine" / "pseudo").glob("*.png"))) == 24
    assert len(list((run_dir / "seg" / "predictions").glob("*.png"))) == 8
    refine_metrics = json.loads((run_dir / "refine" / "metrics.json").read_text())
    assert 0.0 <= refine_metrics["unsure_fraction"] <= 1.0
    assert not list(run_dir.glob(".*"))  # no partial folders left behind


@pytest.mark.e2e
def test_rerun_of_one_stage_is_a_no_op_then_forced(weak_run, capsys):
    cam_before = manifest_time(weak_run, "cam")
    refine_before = manifest_time(weak_run, "refine")
    assert run(weak_run, "--stages", "refine") == 0
    assert "cached" in capsys.readouterr().out
    assert manifest_time(weak_run, "refine") == refine_before
    assert run(weak_run, "--stages", "refine", "--force") == 0
    assert manifest_time(weak_run, "refine")[1] != refine_before[1]
    assert manifest_time(weak_run, "cam") == cam_before  # not listed, never runs
    # refine's key is unchanged by a forced rerun, so seg stays valid
    assert run(weak_run, "--stages", "seg", "--dry-run") == 0
    assert "cached" in capsys.readouterr().out


@pytest.mark.e2e
def test_force_tells_the_stage_to_reuse_nothing_of_its_folder(weak_run, monkeypatch):
    import stages
    refine, asked = stages.STAGES["refine"], []
    original = refine.run
    monkeypatch.setattr(refine, "run", lambda cfg, run_dir, force=False: asked.append(force) or original(
        cfg, run_dir, force))
    assert run(weak_run, "--stages", "refine") == 0 and asked == []  # cached: not run
    assert run(weak_run, "--stages", "refine", "--force") == 0 and asked == [True]


@pytest.mark.e2e
def test_changed_seed_makes_upstream_stale_and_stops_before_work(weak_run, capsys):
    refine_before = manifest_time(weak_run, "refine")
    assert run(weak_run, "--stages", "refine", "--set", "seed=1") == 2
    error = capsys.readouterr().err
    assert "stage cam" in error and "stale" in error and "seed 0 -> 1" in error
    assert "--stages cam,refine" in error
    assert len(error.strip().splitlines()) == 1
    assert manifest_time(weak_run, "refine") == refine_before


@pytest.mark.e2e
def test_a_scoring_change_rescores_the_cached_outputs_without_training(weak_run, capsys):
    run_dir = weak_run / "run"
    models = {stage: (run_dir / stage / "model.pt").read_bytes() for stage in ("cam", "seg")}
    before = {stage: json.loads((run_dir / stage / "metrics.json").read_text()) for stage in ("cam", "seg")}
    refine_before = manifest_time(weak_run, "refine")
    # cam's scoring threshold, seg's flip and CRF at prediction: none changes what a network learns
    scoring = ["--set", "cam.bg_threshold=0.3", "--set", "seg.flip_predict=false",
               "--set", "seg.crf_predict=true"]
    assert run(weak_run, "--dry-run", *scoring) == 0
    out = capsys.readouterr().out
    assert "cam     stale" in out and "only its scoring changed (cam.bg_threshold" in out
    assert "refine  cached" in out and "seg     stale" in out
    assert run(weak_run, *scoring) == 0
    assert " epoch " not in capsys.readouterr().out  # nothing trained
    after = {stage: json.loads((run_dir / stage / "metrics.json").read_text()) for stage in ("cam", "seg")}
    assert all((run_dir / stage / "model.pt").read_bytes() == models[stage] for stage in models)
    assert after["cam"]["bg_threshold"] == 0.3
    assert round(after["cam"]["miou"], 4) == before["cam"]["miou_by_bg_threshold"]["0.3"]
    assert all(after[stage]["train_loss_by_epoch"] == before[stage]["train_loss_by_epoch"] for stage in after)
    assert manifest_time(weak_run, "refine") == refine_before  # cam's CAMs are the same: refine stays
    assert run(weak_run) == 0  # back to the config: scored as at first
    assert json.loads((run_dir / "seg" / "metrics.json").read_text())["miou"] == before["seg"]["miou"]
    assert json.loads((run_dir / "cam" / "metrics.json").read_text())["miou"] == before["cam"]["miou"]


@pytest.mark.e2e
def test_dry_run_reports_stale_stages_and_writes_nothing(weak_run, capsys):
    before = sorted(p.name for p in (weak_run / "run").iterdir())
    old = load_config(DEMO_CONFIG).refine.crf.gt_prob  # the demo's value, whatever it is
    assert run(weak_run, "--dry-run", "--set", "refine.crf.gt_prob=0.95") == 0
    out = capsys.readouterr().out
    assert "cam     cached" in out and "refine  stale" in out
    assert f"refine.crf.gt_prob {old!r} -> 0.95" in out
    assert "seg     stale" in out and "refine output changed" in out
    assert sorted(p.name for p in (weak_run / "run").iterdir()) == before


@pytest.mark.e2e
def test_corrupt_cache_file_is_a_clear_error_and_leaves_no_output(weak_run, capsys):
    run_dir = weak_run / "run"
    victim = sorted((run_dir / "cam" / "cams").glob("*.npz"))[3]
    data = victim.read_bytes()
    try:
        for corrupt in (b"not an npz", data[: len(data) // 2]):
            victim.write_bytes(corrupt)
            assert run(weak_run, "--stages", "refine", "--force") == 2
            assert victim.name in capsys.readouterr().err
            assert (run_dir / "refine" / "manifest.json").exists()  # the previous output survives
            assert not list(run_dir.glob(".refine*"))
    finally:
        victim.write_bytes(data)


@pytest.mark.e2e
def test_full_mode_trains_seg_on_ground_truth_without_cam_or_refine(weak_run, capsys):
    full_dir = weak_run / "full"
    assert run(weak_run, "--mode", "full", "--stages", "seg", "--run-dir", str(full_dir)) == 0
    assert stage_folders(full_dir) == ["seg"]
    assert json.loads((full_dir / "seg" / "metrics.json").read_text())["mode"] == "full"
    assert "seg" in capsys.readouterr().out


@pytest.mark.e2e
def test_mixed_mode_scores_student_and_teacher_and_caches_on_the_full_subset(weak_run, capsys):
    """Eroded weak labels need no upstream stage; pseudo-mask weak labels read refine's."""
    mixed_dir = weak_run / "mixed"
    erode = ["--mode", "mixed", "--run-dir", str(mixed_dir), "--set", "mixed.weak_source=erode",
             "--set", "mixed.full_fraction=0.25"]
    assert run(weak_run, *erode) == 0
    assert stage_folders(mixed_dir) == ["seg"]
    seg_dir = mixed_dir / "seg"
    metrics = json.loads((seg_dir / "metrics.json").read_text())
    summary = (f"{100 * metrics['miou']:.1f}" + r"\s+[0-9.]+  ran; teacher branch "
               + f"{100 * metrics['teacher']['miou']:.1f}")
    assert re.search(r"seg\s+" + summary, capsys.readouterr().out)  # the mIoU column is the student's
    assert metrics["mode"] == "mixed" and metrics["full_images"] == 6
    assert len((seg_dir / "full_ids.txt").read_text().split()) == 6
    for scores in (metrics, metrics["teacher"]):
        assert 0.0 <= scores["miou"] <= 1.0 and 0.0 <= scores["mean_dice"] <= 1.0
        assert "per_class_hd95" in scores
    assert len(list((seg_dir / "predictions_teacher").glob("*.png"))) == 8
    # BCP's copy-paste from the second epoch: trains to finite losses; model.pt leaves its EMA out
    bcp_dir = weak_run / "mixed-bcp"
    assert run(weak_run, *erode[:2], "--run-dir", str(bcp_dir), *erode[4:], "--set", "seg.train.epochs=2",
               "--set", "seg.sr.enabled=false", "--set", "mixed.copy_paste.enabled=true",
               "--set", "mixed.copy_paste.start=0.5") == 0
    bcp = json.loads((bcp_dir / "seg" / "metrics.json").read_text())
    assert len(bcp["train_loss_by_epoch"]) == 2
    saved = torch.load(bcp_dir / "seg" / "model.pt", weights_only=True)
    assert not any(key.startswith("ema.") for key in saved)
    capsys.readouterr()
    assert run(weak_run, *erode, "--set", "mixed.full_fraction=0.5", "--dry-run") == 0
    assert "seg     stale" in capsys.readouterr().out
    # Pseudo masks as weak labels: the mode's stages are cam, refine and seg; cam and refine are
    # the weak run's, cached.
    pseudo_dir = weak_run / "mixed-pseudo"
    pseudo_dir.mkdir()
    for stage in ("cam", "refine"):
        shutil.copytree(weak_run / "run" / stage, pseudo_dir / stage)
    assert run(weak_run, "--mode", "mixed", "--run-dir", str(pseudo_dir), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "cam     cached" in out and "refine  cached" in out and "seg     missing" in out


@pytest.mark.e2e
def test_scribble_weak_labels_need_a_scribbles_folder(weak_run, capsys):
    assert run(weak_run, "--mode", "mixed", "--set", "mixed.weak_source=scribble",
               "--run-dir", str(weak_run / "scribble")) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "has no scribbles" in error and "Scribbles" in error
    assert not (weak_run / "scribble").exists()


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cases = [
        ["--set", "cam.train.epoch=3"],
        ["--set", "seed=abc"],
        ["--stages", "cam,paint"],
        ["--mode", "full", "--stages", "cam"],
        ["--set", "demo=null", "--set", f"data.root={tmp_path / 'missing'}"],
        ["--config", str(tmp_path / "none.yaml")],
        ["--set", f"data.root={tmp_path / 'demo'}", "--set", "demo.num_train=4", "--set", "demo.num_val=2",
         "--set", "demo.min_size=32", "--set", "demo.max_size=32"],  # batch 16 > 4 train images
        sum((["--set", item] for item in TINY), [])
        + ["--set", f"data.root={tmp_path / 'demo'}",
           "--set", f"cam.backbone.weights={tmp_path / 'none.pth'}"],
    ]
    for extra in cases:
        assert main(["--config", DEMO_CONFIG, "--run-dir", str(run_dir)] + extra) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and len(error.splitlines()) == 1, (extra, error)
    assert not run_dir.exists()


def test_affinitynet_batch_larger_than_the_train_split_stops_before_any_stage(tmp_path, capsys):
    assert run(tmp_path, "--set", "refine.method=affinity",
               "--set", "refine.affinity.train.batch_size=32") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "'refine.affinity.train.batch_size' is 32" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_pretrained_efficientnet_lite0_runs_through_every_stage(weak_run):
    """Both networks on the offline ImageNet weights, in a run of their own."""
    lite = ["--set", "cam.backbone.name=efficientnet_lite0", "--set", "cam.backbone.weights=imagenet",
            "--set", "seg.backbone.name=efficientnet_lite0", "--set", "seg.backbone.weights=imagenet"]
    assert run(weak_run, "--run-dir", str(weak_run / "lite0"), *lite) == 0
    manifest = json.loads((weak_run / "lite0" / "seg" / "manifest.json").read_text())
    assert manifest["inputs"]["weights_fingerprint"].startswith("imagenet:efficientnet-lite0")


def test_imagenet_weights_that_cannot_be_fetched_stop_before_any_stage(tmp_path, capsys, monkeypatch):
    from urllib.error import URLError

    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(*args, **kwargs):
        raise URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    # seg is the last stage: its weights must be checked before cam trains.
    assert run(tmp_path, "--set", "seg.backbone.weights=imagenet") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "seg.backbone.weights: /path/to/resnet18-f37072fd.pth" in error
    assert not (tmp_path / "run").exists()


AFFINITY = ["refine.method=affinity", "refine.affinity.backbone.name=resnet18",
            "refine.affinity.train.epochs=1", "refine.affinity.train.batch_size=8",
            "refine.affinity.train.crop_size=48",
            "refine.affinity.train.head_lr_mult=1", "refine.affinity.embedding_channels=16",
            "refine.random_walk.iterations=8"]


@pytest.mark.e2e
def test_affinity_refine_keeps_crf_and_final_masks_and_caches_the_net_under_its_own_key(weak_run, capsys):
    run_dir = weak_run / "affinity"
    shutil.copytree(weak_run / "run" / "cam", run_dir / "cam")
    settings = sum((["--set", item] for item in AFFINITY), ["--run-dir", str(run_dir)])
    assert run(weak_run, *settings) == 0  # refine (CRF masks, AffinityNet, walk) and seg
    metrics = json.loads((run_dir / "refine" / "metrics.json").read_text())
    assert metrics["method"] == "affinity" and 0 <= metrics["crf"]["miou"] <= 1 and 0 <= metrics["miou"] <= 1
    cam_miou = json.loads((run_dir / "cam" / "metrics.json").read_text())["miou"]
    assert metrics["gain_over_cam"] == round(metrics["miou"] - cam_miou, 4)
    assert metrics["unsure_fraction"] == 0  # PSA's argmax rule labels every pixel
    net = json.loads((run_dir / "affinitynet" / "metrics.json").read_text())
    assert net["train_steps"] == 3 and len(net["train_neg_affinity_by_epoch"]) == 1
    for folder in ("crf", "pseudo"):
        assert len(list((run_dir / "refine" / folder).glob("*.png"))) == 24
    net_before = manifest_time(weak_run, "affinitynet", run_dir)
    capsys.readouterr()

    # A random-walk parameter: refine and seg are stale, the AffinityNet is reused.
    assert run(weak_run, *settings, "--set", "refine.random_walk.beta=4", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "refine  stale" in out and "refine.random_walk.beta 8.0 -> 4" in out and "seg     stale" in out
    assert "  affinitynet  cached   -> reuse" in out
    assert run(weak_run, *settings, "--set", "refine.random_walk.beta=4", "--stages", "refine") == 0
    assert "reusing the network in" in capsys.readouterr().err
    assert manifest_time(weak_run, "affinitynet", run_dir) == net_before

    # PSA's pair labels (the default) do not read refine's two thresholds; IRNet's way does.
    assert run(weak_run, *settings, "--set", "refine.random_walk.beta=4", "--set", "refine.fg_threshold=0.6",
               "--dry-run") == 0
    assert "refine  cached" in capsys.readouterr().out
    assert run(weak_run, *settings, "--set", "refine.affinity.labels=thresholds", "--dry-run") == 0
    assert "  affinitynet  stale" in capsys.readouterr().out

    # An AffinityNet parameter retrains it.
    assert run(weak_run, *settings, "--set", "refine.affinity.radius=3", "--stages", "refine") == 0
    assert "reusing" not in capsys.readouterr().err
    assert manifest_time(weak_run, "affinitynet", run_dir) != net_before


IRN = ["refine.method=irn", "refine.irn.backbone.name=resnet18", "refine.irn.train.epochs=1",
       "refine.irn.train.batch_size=8", "refine.irn.train.crop_size=48", "refine.irn.radius=5",
       "refine.irn_walk.iterations=8"]


IRN_SETTINGS = sum((["--set", item] for item in IRN), ["--stages", "refine"])


@pytest.fixture(scope="module")
def irn_run(weak_run):
    """The weak run's CAMs refined with ``refine.method: irn``: the run folder."""
    run_dir = weak_run / "irn"
    shutil.copytree(weak_run / "run" / "cam", run_dir / "cam")
    assert run(weak_run, *IRN_SETTINGS, "--run-dir", str(run_dir)) == 0
    return run_dir


@pytest.mark.e2e
def test_irn_refine_learns_a_boundary_map_and_walks_with_it(weak_run, irn_run, capsys):
    run_dir = irn_run
    settings = IRN_SETTINGS + ["--run-dir", str(run_dir)]
    metrics = json.loads((run_dir / "refine" / "metrics.json").read_text())
    assert metrics["method"] == "irn" and metrics["unsure_fraction"] == 0 and metrics["net_train_steps"] == 3
    assert len(list((run_dir / "refine" / "pseudo").glob("*.png"))) == 24
    assert (run_dir / "irn" / "model.pt").is_file() and not (run_dir / "affinitynet").exists()
    capsys.readouterr()
    # The walk's settings and the affinity method's do not retrain the boundary network.
    assert run(weak_run, *settings, "--set", "refine.irn_walk.bg_threshold=0.4",
               "--set", "refine.affinity.radius=3", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "refine  stale" in out and "  irn          cached   -> reuse" in out
    assert "refine.affinity" not in out


@pytest.mark.e2e
def test_refine_speed_benchmark_times_the_crf_and_the_walk_and_saves_the_stages_masks(weak_run, irn_run,
                                                                                      tmp_path):
    """benchmarks/refine_speed.py on an IRN run: both CRF timings, the walk's, and walked masks
    equal to the ones the stage wrote."""
    import subprocess
    import sys

    import numpy as np
    from conftest import ROOT

    from pipeline.core.io import load_mask

    run_dir = irn_run
    settings = TINY + IRN + [f"data.root={weak_run / 'demo'}"]
    command = [sys.executable, str(ROOT / "benchmarks" / "refine_speed.py"), "--config", DEMO_CONFIG,
               "--run-dir", str(run_dir), "--images", "6", "--save-masks", str(tmp_path / "masks")]
    command += [arg for item in settings for arg in ("--set", item)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "CRF masks, 1 worker(s)" in done.stdout and "CRF masks, 2 worker(s)" in done.stdout
    walk = r"irn walk \(8 steps, radius 5\), cpu, \d+ images: [0-9.]+ s/image"
    assert re.search(walk, done.stdout), done.stdout
    saved = sorted((tmp_path / "masks").glob("*.png"))
    assert saved
    for path in saved:
        stage_mask = load_mask(run_dir / "refine" / "pseudo" / path.name)
        assert np.array_equal(load_mask(path), stage_mask), path.name


@pytest.mark.e2e
def test_refine_montage_draws_a_row_per_image_and_refuses_a_crf_run(weak_run, irn_run, tmp_path):
    """tools/refine_montage.py on the IRN run: photo, truth, CAM, network's labels, pseudo mask and
    boundary side by side, one row per shown image; a config of method crf is a one-line error."""
    import subprocess
    import sys

    from conftest import ROOT
    from PIL import Image

    settings = TINY + IRN + [f"data.root={weak_run / 'demo'}"]
    command = [sys.executable, str(ROOT / "tools" / "refine_montage.py"), "--config", DEMO_CONFIG,
               "--run-dir", str(irn_run), "--every", "10", "--height", "40", "--out", str(tmp_path / "m.png")]
    command += [arg for item in settings for arg in ("--set", item)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"{tmp_path / 'm.png'}: 3 images, columns: photo, ground truth, CAM, "
                                   "network's labels, pseudo mask, boundary")  # train images 3, 13 and 23
    with Image.open(tmp_path / "m.png") as montage:
        assert montage.height == 3 * 40 and montage.width >= 6 * 40 * 0.75
    refused = subprocess.run(command + ["--set", "refine.method=crf"], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("error: refine.method is crf: the montage shows a relation network's")


@pytest.mark.e2e
def test_crf_refine_ignores_affinity_settings(weak_run, capsys):
    assert run(weak_run, "--dry-run", "--set", "refine.random_walk.beta=3",
               "--set", "refine.affinity.radius=2") == 0
    assert "refine  cached" in capsys.readouterr().out


@pytest.mark.e2e
def test_train_split_scoring_reloads_the_seg_model_and_rejects_a_mismatched_config(weak_run):
    """tools/score_seg_on_train.py: the saved model, reloaded, scores val exactly as the seg
    stage did; a config describing another network is a one-line error."""
    import subprocess
    import sys

    import torch
    from conftest import ROOT

    from pipeline.core.training import load_checkpoint
    from pipeline.data.dataset import open_dataset
    from stages.seg import predict_and_score, segmentation_network

    overrides = TINY + [f"data.root={weak_run / 'demo'}"]
    cfg = load_config(DEMO_CONFIG, overrides)
    dataset = open_dataset(cfg.data)
    model = segmentation_network(cfg, dataset.num_classes, training=False)
    load_checkpoint(weak_run / "run" / "seg" / "model.pt", model)
    scores = predict_and_score(model, dataset, dataset.split_ids("val"), cfg.seg.flip_predict,
                               torch.device("cpu"), None)
    metrics = json.loads((weak_run / "run" / "seg" / "metrics.json").read_text())
    assert list(scores) == ["predictions"]
    assert scores["predictions"].result()["miou"] == pytest.approx(metrics["miou"])

    command = [sys.executable, str(ROOT / "tools" / "score_seg_on_train.py"), "--config", DEMO_CONFIG,
               "--run-dir", str(weak_run / "run")] + [arg for item in overrides for arg in ("--set", item)]
    done = subprocess.run(command + ["--json", str(weak_run / "train_score.json")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("predictions ") and "train mIoU" in done.stdout
    written = json.loads((weak_run / "train_score.json").read_text())["predictions"]
    assert f"train mIoU {100 * written['miou']:.1f} " in done.stdout
    assert set(written["per_class_iou"]) == set(dataset.classes)
    mismatched = subprocess.run(command + ["--mode", "mixed"], capture_output=True, text=True)
    assert mismatched.returncode == 2
    assert mismatched.stderr.strip().count("\n") == 0
    assert "does not match the config's network" in mismatched.stderr


@pytest.mark.e2e
def test_a_loss_that_stops_being_finite_stops_the_stage_and_caches_nothing(tmp_path, capsys):
    assert run(tmp_path, "--stages", "cam", "--set", "cam.train.lr=1e30") == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0, error
    assert re.search(r"error: cam: the loss is (nan|inf) at epoch 1, step \d", error), error
    assert "nothing was cached" in error
    assert not (tmp_path / "run" / "cam").exists() and not list((tmp_path / "run").glob(".cam*"))


@pytest.mark.e2e
def test_a_second_run_on_a_folder_in_use_stops_and_a_dead_runs_lock_is_taken_over(weak_run, tmp_path, capsys):
    import subprocess
    import sys

    run_dir = tmp_path / "busy"
    shutil.copytree(weak_run / "run", run_dir)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipeline.core.cache import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)"), str(run_dir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run(weak_run, "--stages", "refine", "--run-dir", str(run_dir)) == 2
        error = capsys.readouterr().err.strip()
        assert error == f"error: run folder {run_dir} is in use by process {holder.pid}"
    finally:
        holder.kill()
        holder.wait()
    assert (run_dir / ".lock").read_text() == str(holder.pid)  # a killed run leaves its lock file
    assert run(weak_run, "--stages", "refine", "--run-dir", str(run_dir)) == 0
    assert "cached" in capsys.readouterr().out and not (run_dir / ".lock").exists()


@pytest.mark.e2e
def test_a_truncated_or_deleted_output_makes_its_stage_damaged(weak_run, tmp_path, capsys):
    run_dir = tmp_path / "damaged"
    shutil.copytree(weak_run / "run", run_dir)
    model = run_dir / "cam" / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    assert run(weak_run, "--dry-run", "--run-dir", str(run_dir)) == 0
    assert f"cam     damaged  -> run: {model} has 1000 bytes" in capsys.readouterr().out
    assert run(weak_run, "--stages", "refine", "--force", "--run-dir", str(run_dir)) == 2
    error = capsys.readouterr().err
    assert "needs the output of stage cam, which is damaged" in error and "--stages cam,refine" in error
    shutil.rmtree(run_dir / "cam")
    shutil.copytree(weak_run / "run" / "cam", run_dir / "cam")
    victim = sorted((run_dir / "refine" / "pseudo").glob("*.png"))[0]
    victim.unlink()
    assert run(weak_run, "--dry-run", "--run-dir", str(run_dir)) == 0
    assert f"refine  damaged  -> run: {victim} is missing" in capsys.readouterr().out


def _interrupt(monkeypatch, module, name, after):
    """Replaces ``module.name`` by a wrapper raising KeyboardInterrupt (what Ctrl-C, or a kill,
    does to a stage) at its call number ``after + 1``."""
    original, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.e2e
def test_an_interrupted_run_resumes_every_stage_and_ends_bit_identical(tmp_path, monkeypatch, capsys):
    import numpy as np

    import pipeline.refinement.masks
    import stages.cam
    import stages.seg
    from pipeline.core.io import load_arrays

    two_epochs = ["--set", "cam.train.epochs=2", "--set", "seg.train.epochs=2", "--set", "refine.workers=1",
                  "--set", "seg.sr.enabled=true"]  # as the demo ships it
    assert run(tmp_path, *two_epochs, "--run-dir", str(tmp_path / "reference")) == 0
    interruptions = [  # (module, function, calls that succeed first): 3 training steps per epoch
        (stages.cam, "classification_loss", 4),  # cam training, epoch 2
        (stages.cam, "multiscale_cams", 5),  # CAM inference
        (pipeline.refinement.masks, "pseudo_mask", 5),  # CRF masks
        (stages.seg, "sr_segmentation_loss", 4),  # seg training, epoch 2
        (stages.seg, "predict_batch", 3),  # seg prediction
    ]
    for module, name, after in interruptions:
        with monkeypatch.context() as patch:
            _interrupt(patch, module, name, after)
            with pytest.raises(KeyboardInterrupt):
                run(tmp_path, *two_epochs)
    capsys.readouterr()
    assert run(tmp_path, *two_epochs) == 0
    assert "seg (weak): resuming after epoch 2/2" in capsys.readouterr().out  # trained; prediction resumes
    reference, resumed = tmp_path / "reference", tmp_path / "run"
    for folder, pattern in (("cam", "model.pt"), ("seg", "model.pt"), ("refine/pseudo", "*.png"),
                            ("seg/predictions", "*.png")):
        files = sorted((reference / folder).glob(pattern))
        assert files, folder
        assert all((resumed / folder / f.name).read_bytes() == f.read_bytes() for f in files), folder
    for path in sorted((reference / "cam" / "cams").glob("*.npz")):
        a, b = load_arrays(path), load_arrays(resumed / "cam" / "cams" / path.name)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    for stage in ("cam", "refine", "seg"):
        before, after = (json.loads((d / stage / "metrics.json").read_text()) for d in (reference, resumed))
        assert after["miou"] == before["miou"]
        assert after.get("train_loss_by_epoch") == before.get("train_loss_by_epoch")
    assert json.loads((resumed / "seg" / "metrics.json").read_text())["resumed"] is True
    assert not list(resumed.glob(".*")) and not (resumed / "seg" / "checkpoint.pt").exists()


@pytest.mark.e2e
def test_advcam_reads_other_cams_from_the_same_network(weak_run, tmp_path):
    advcam = ["--stages", "cam", "--set", "cam.advcam.enabled=true", "--set", "cam.advcam.iterations=3",
              "--set", f"data.root={weak_run / 'demo'}"]
    assert run(tmp_path, *advcam) == 0
    plain, climbed = weak_run / "run" / "cam", tmp_path / "run" / "cam"
    before, after = (json.loads((d / "metrics.json").read_text()) for d in (plain, climbed))
    assert after["train_loss_by_epoch"] == before["train_loss_by_epoch"]  # the network trains the same
    read, changed = 0, 0
    for image_id in sorted(p.stem for p in plain.glob("cams/*.npz")):
        (a, a_classes), (b, b_classes) = (load_cams(d / "cams", image_id) for d in (plain, climbed))
        assert list(a_classes) == list(b_classes) and a.shape == b.shape
        read += bool(a.any())  # a one-epoch network's CAMs are often all zero
        changed += not np.array_equal(a, b)
    assert changed >= read > 0  # a map that was zero can rise as the other classes fall


@pytest.mark.e2e
def test_recam_trains_after_the_cam_network_and_resumes_bit_identical(weak_run, tmp_path, monkeypatch,
                                                                       capsys):
    import torch

    import stages.cam

    recam = ["--stages", "cam", "--set", "cam.recam.enabled=true", "--set", "cam.recam.epochs=2",
             "--set", f"data.root={weak_run / 'demo'}"]
    assert run(tmp_path, *recam, "--run-dir", str(tmp_path / "reference")) == 0
    with monkeypatch.context() as patch:
        _interrupt(patch, stages.cam, "recam_training_loss", 4)  # 3 steps per epoch: ReCAM's epoch 2
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, *recam)
    assert run(tmp_path, *recam) == 0
    assert "recam: resuming after epoch 1/2" in capsys.readouterr().out
    reference, resumed = tmp_path / "reference" / "cam", tmp_path / "run" / "cam"
    assert (resumed / "model.pt").read_bytes() == (reference / "model.pt").read_bytes()
    assert [p.read_bytes() for p in sorted(resumed.glob("cams/*"))] == \
        [p.read_bytes() for p in sorted(reference.glob("cams/*"))]
    metrics = json.loads((resumed / "metrics.json").read_text())
    plain = json.loads((weak_run / "run" / "cam" / "metrics.json").read_text())
    # The CAM network trains exactly as without ReCAM; then ReCAM's two epochs, with its terms.
    assert metrics["train_loss_by_epoch"] == plain["train_loss_by_epoch"]
    assert len(metrics["recam_ce_by_epoch"]) == len(metrics["recam_multilabel_by_epoch"]) == 2
    assert "recam.weight" in torch.load(resumed / "model.pt", weights_only=True)
    assert metrics["miou"] != plain["miou"]
    assert not list(resumed.glob("checkpoint*"))


@pytest.mark.e2e
def test_self_training_round_trains_on_the_first_networks_masks_and_resumes_bit_identical(
        weak_run, tmp_path, monkeypatch, capsys):
    import pipeline.methods.self_training
    import stages.seg

    rounds = ["--set", "seg.self_training.enabled=true", "--set", "seg.self_training.rounds=1",
              "--set", f"data.root={weak_run / 'demo'}"]
    for run_dir in ("reference", "run"):  # cam and refine as the weak run made them
        shutil.copytree(weak_run / "run" / "cam", tmp_path / run_dir / "cam")
        shutil.copytree(weak_run / "run" / "refine", tmp_path / run_dir / "refine")
    assert run(tmp_path, *rounds, "--run-dir", str(tmp_path / "reference")) == 0
    for module, name, after in ((pipeline.methods.self_training, "crf_refine_scores", 5),  # round 0's masks
                                (stages.seg, "sr_segmentation_loss", 1)):  # the last network, step 2
        with monkeypatch.context() as patch:
            _interrupt(patch, module, name, after)
            with pytest.raises(KeyboardInterrupt):
                run(tmp_path, *rounds)
    assert run(tmp_path, *rounds) == 0
    reference, resumed = tmp_path / "reference" / "seg", tmp_path / "run" / "seg"
    masks = sorted((reference / "round-0" / "pseudo").glob("*.png"))
    assert len(masks) == 24
    for path in masks + sorted(reference.glob("predictions/*.png")) + [reference / "model.pt"]:
        assert (resumed / path.relative_to(reference)).read_bytes() == path.read_bytes(), path
    metrics = json.loads((resumed / "metrics.json").read_text())
    (first,) = metrics["self_training"]
    assert first["round"] == 0
    assert first["pseudo_masks"]["miou"] is not None and first["val"]["miou"] is not None
    # Round 0 is the network a run without self-training trains: the same losses.
    plain = json.loads((weak_run / "run" / "seg" / "metrics.json").read_text())
    assert first["train_loss_by_epoch"] == plain["train_loss_by_epoch"]
    assert not list(resumed.glob("checkpoint*"))
    # The flip makes the next round's masks: part of training here, not of scoring.
    assert run(tmp_path, *rounds, "--set", "seg.flip_predict=false", "--dry-run") == 0
    assert "seg     stale    -> run: made under different inputs" in capsys.readouterr().out
    # A rescoring scores the rounds' masks again from their files; their networks are gone.
    assert run(tmp_path, *rounds, "--set", "seg.crf_predict=true") == 0
    rescored = json.loads((resumed / "metrics.json").read_text())
    assert rescored["train_loss_by_epoch"] == metrics["train_loss_by_epoch"]
    (again,) = rescored["self_training"]
    assert again["pseudo_masks"] == first["pseudo_masks"] and again["val"]["miou"] is None
    # Other modes neither use nor depend on it.
    full = load_config(DEMO_CONFIG, TINY + [f"data.root={weak_run / 'demo'}"], mode="full")
    with_rounds = load_config(DEMO_CONFIG, TINY + [f"data.root={weak_run / 'demo'}",
                                                   "seg.self_training.enabled=true"], mode="full")
    assert stages.seg.own_inputs(full) == stages.seg.own_inputs(with_rounds)


@pytest.mark.e2e
def test_an_affinitynet_interrupted_in_training_or_in_its_walk_resumes_bit_identical(weak_run, monkeypatch,
                                                                                     capsys):
    """The two phases of refine.method affinity the test above leaves out: its network's
    training (epoch 2) and the random walk, each interrupted, then the same command again."""
    import pipeline.refinement.psa
    from pipeline.refinement.psa import PsaWalk

    settings = sum((["--set", item] for item in AFFINITY + ["refine.affinity.train.epochs=2",
                                                             "refine.workers=1"]), ["--stages", "refine"])
    reference, resumed = weak_run / "affinity-reference", weak_run / "affinity-resumed"
    for run_dir in (reference, resumed):
        shutil.copytree(weak_run / "run" / "cam", run_dir / "cam")
    assert run(weak_run, *settings, "--run-dir", str(reference)) == 0
    interruptions = [  # (owner, function, calls that succeed first): 3 training steps per epoch
        (pipeline.refinement.psa, "_affinity_training_loss", 4),  # AffinityNet training, epoch 2
        (PsaWalk, "walked_scores", 5),  # the random walk
    ]
    for owner, name, after in interruptions:
        with monkeypatch.context() as patch:
            _interrupt(patch, owner, name, after)
            with pytest.raises(KeyboardInterrupt):
                run(weak_run, *settings, "--run-dir", str(resumed))
    capsys.readouterr()
    assert run(weak_run, *settings, "--run-dir", str(resumed)) == 0
    assert "reusing the network in" in capsys.readouterr().err  # trained before the walk's interruption
    outputs = (("affinitynet", "model.pt"), ("affinitynet/crf", "*.png"), ("refine/pseudo", "*.png"))
    for folder, pattern in outputs:
        files = sorted((reference / folder).glob(pattern))
        assert files, folder
        assert all((resumed / folder / f.name).read_bytes() == f.read_bytes() for f in files), folder
    for folder in ("affinitynet", "refine"):
        before, after = (json.loads((d / folder / "metrics.json").read_text()) for d in (reference, resumed))
        assert after.get("miou") == before.get("miou")
        assert after.get("train_loss_by_epoch") == before.get("train_loss_by_epoch")
    assert not list(resumed.glob(".*"))


def test_fp16_on_the_cpu_stops_before_any_work(tmp_path, capsys):
    assert run(tmp_path, "--set", "device=cpu", "--set", "seg.train.amp=fp16") == 2
    assert capsys.readouterr().err.strip() == ("error: config key 'seg.train.amp' is fp16, which needs a "
                                               "CUDA device; use bf16 or off on the CPU")
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_train_loop_benchmark_trains_ours_and_the_bare_loop_alike(weak_run):
    """benchmarks/train_loop_overhead.py: one round of each loop on the tiny demo, the ratio printed."""
    import subprocess
    import sys

    from conftest import ROOT

    settings = TINY + [f"data.root={weak_run / 'demo'}"]
    command = [sys.executable, str(ROOT / "benchmarks" / "train_loop_overhead.py"), "--config", DEMO_CONFIG,
               "--rounds", "1"] + [arg for item in settings for arg in ("--set", item)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("24 images, batch 8, crop 48, resnet18, cpu")
    assert re.search(r"round 1, ours: [0-9.]+ images/s", done.stdout) and "round 1, bare:" in done.stdout
    assert re.search(r"ratio ours/bare [0-9.]+$", done.stdout.strip()), done.stdout
    refused = subprocess.run(command + ["--set", "cam.sr.enabled=true"], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "error: config key 'cam.sr.enabled' is true: the bare loop has no Self-Regulation loss "
        "to compare with")


@pytest.mark.e2e
def test_bf16_autocast_trains_every_network_on_the_cpu(weak_run):
    """train.amp: bf16 runs the autocast path a GPU run takes (CPU bf16 autocast): the cam
    classifier, both SR losses, the AffinityNet, IRNet's boundary network and the mixed-mode
    segmenter train to finite losses and write their outputs. The cam network trained in bf16
    differs from the weak run's float32 one, which shares every other setting: autocast was on."""
    bf16 = ["cam.train.amp=bf16", "seg.train.amp=bf16", "refine.affinity.train.amp=bf16",
            "refine.irn.train.amp=bf16"]
    cam_only = weak_run / "bf16-cam"
    bf16_settings = sum((["--set", s] for s in bf16), [])
    assert run(weak_run, "--run-dir", str(cam_only), "--stages", "cam", *bf16_settings) == 0
    float32_model = (weak_run / "run" / "cam" / "model.pt").read_bytes()
    assert (cam_only / "cam" / "model.pt").read_bytes() != float32_model

    run_dir = weak_run / "bf16-mixed"
    settings = sum((["--set", s] for s in bf16 + AFFINITY + ["cam.sr.enabled=true", "seg.sr.enabled=true"]),
                   ["--run-dir", str(run_dir), "--mode", "mixed", "--set", "mixed.full_fraction=0.25"])
    assert run(weak_run, *settings) == 0
    losses = [json.loads((run_dir / stage / "metrics.json").read_text())["train_loss_by_epoch"]
              for stage in ("cam", "seg")]
    losses.append(json.loads((run_dir / "affinitynet" / "metrics.json").read_text())["train_loss_by_epoch"])
    assert all(curve and all(value is not None for value in curve) for curve in losses), losses
    assert len(list((run_dir / "seg" / "predictions").glob("*.png"))) == 8

    irn = sum((["--set", s] for s in bf16 + IRN + ["cam.sr.enabled=true"]),
              ["--run-dir", str(run_dir), "--stages", "refine"])
    assert run(weak_run, *irn) == 0
    assert json.loads((run_dir / "irn" / "metrics.json").read_text())["train_loss_by_epoch"][0] is not None


@pytest.mark.e2e
@pytest.mark.parametrize("rule", ["otsu", "yen"])
def test_label_free_thresholds_come_from_the_train_cams_and_make_the_masks_fixed_ones_make(
        weak_run, tmp_path, rule):
    runs = {name: tmp_path / name for name in (rule, "fixed")}
    for run_dir in runs.values():
        run_dir.mkdir()
        shutil.copytree(weak_run / "run" / "cam", run_dir / "cam")
    assert run(weak_run, "--run-dir", str(runs[rule]), "--stages", "refine",
               "--set", f"refine.thresholds={rule}") == 0
    metrics = json.loads((runs[rule] / "refine" / "metrics.json").read_text())
    cam_files = sorted((runs[rule] / "cam" / "cams").glob("*.npz"))
    histogram = sum(max_cam_histogram(load_cams(f.parent, f.stem)[0]) for f in cam_files)
    assert metrics["thresholds"] == rule
    expected = tuple(round(t, 4) for t in cam_thresholds(histogram, rule))
    assert (metrics["fg_threshold"], metrics["bg_threshold"]) == expected
    assert 0 < metrics["bg_threshold"] < metrics["fg_threshold"] < 1
    # cam scores its CAMs at the same high threshold, beside its configured one.
    cam_metrics = json.loads((runs[rule] / "cam" / "metrics.json").read_text())
    assert cam_metrics[f"{rule}_bg_threshold"] == metrics["fg_threshold"]
    assert 0 <= cam_metrics[f"{rule}_miou"] <= 1
    assert run(weak_run, "--run-dir", str(runs["fixed"]), "--stages", "refine",
               "--set", "refine.thresholds=fixed", "--set", f"refine.fg_threshold={metrics['fg_threshold']}",
               "--set", f"refine.bg_threshold={metrics['bg_threshold']}") == 0
    masks = {name: {p.name: p.read_bytes() for p in (run_dir / "refine" / "pseudo").glob("*.png")}
             for name, run_dir in runs.items()}
    assert len(masks[rule]) == 24 and masks[rule] == masks["fixed"]


@pytest.mark.e2e
def test_region_snapping_votes_the_masks_refine_makes_without_it(weak_run, tmp_path):
    from pipeline.core.config import RegionsConfig
    from pipeline.core.io import load_mask, read_rgb
    from pipeline.methods.regions import image_regions, vote_in_regions
    run_dir = tmp_path / "snapped"
    run_dir.mkdir()
    shutil.copytree(weak_run / "run" / "cam", run_dir / "cam")
    assert run(weak_run, "--run-dir", str(run_dir), "--stages", "refine",
               "--set", "refine.regions.enabled=true", "--set", "refine.regions.scale=100") == 0
    assert json.loads((run_dir / "refine" / "metrics.json").read_text())["regions"] is True
    images = weak_run / "demo" / "JPEGImages"
    changed = 0
    for path in sorted((weak_run / "run" / "refine" / "pseudo").glob("*.png")):
        image = read_rgb(next(images.glob(path.stem + ".*")))
        expected = vote_in_regions(load_mask(path), image_regions(image, RegionsConfig(True, scale=100)))
        snapped = load_mask(run_dir / "refine" / "pseudo" / path.name)
        assert (snapped == expected).all()
        changed += (snapped != load_mask(path)).any()
    assert changed  # the vote moved some labels
