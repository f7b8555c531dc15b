"""torchrun with two CPU processes (gloo) on the tiny demo: every stage runs, training runs
in both processes, and the per-image outputs of a sharded loop equal a single process's."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import DEMO_CONFIG, ROOT, TINY, run

from pipeline.core.io import load_mask

pytestmark = pytest.mark.e2e


def torchrun(tmp_path, run_dir, *args):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "run_pipeline.py"), "--config", DEMO_CONFIG, "--run-dir", str(run_dir)]
    # One thread and one CRF worker per process: two processes on a 2-core machine.
    for item in TINY + [f"data.root={tmp_path / 'demo'}", "num_threads=1", "refine.workers=1"]:
        argv += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(argv + list(args), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("single")
    assert run(tmp_path, "--set", "num_threads=1", "--set", "refine.workers=1") == 0
    return tmp_path


def test_two_processes_run_every_stage_and_both_train(single):
    # SR in seg: its exits' forward must pass through DistributedDataParallel too.
    done = torchrun(single, single / "two", "--set", "seg.sr.enabled=true")
    assert done.returncode == 0, done.stderr[-3000:]
    for process in (0, 1):  # cam and seg, each a batch of 8 shared by the two
        assert done.stderr.count(f"process {process} of 2 trained 3 steps of 4 images") == 2
    run_dir = single / "two"
    assert len(list((run_dir / "cam" / "cams").glob("*.npz"))) == 24
    assert len(list((run_dir / "refine" / "pseudo").glob("*.png"))) == 24
    assert len(list((run_dir / "seg" / "predictions").glob("*.png"))) == 8
    metrics = json.loads((run_dir / "seg" / "metrics.json").read_text())
    assert metrics["scored_images"] == 8 and 0 <= metrics["miou"] <= 1
    assert done.stdout.count("run folder:") == 1  # one table, from the main process
    assert not list(run_dir.glob(".*.partial"))


def test_sharded_refine_equals_a_single_process_refine(single):
    """Both runs read the same cam output: the CRF masks and their scores must agree exactly."""
    run_dir = single / "two-refine"
    shutil.copytree(single / "run" / "cam", run_dir / "cam")
    done = torchrun(single, run_dir, "--stages", "refine")
    assert done.returncode == 0, done.stderr[-3000:]
    ids = sorted(p.stem for p in (single / "run" / "refine" / "pseudo").glob("*.png"))
    assert len(ids) == 24
    for image_id in ids:
        assert np.array_equal(load_mask(run_dir / "refine" / "pseudo" / f"{image_id}.png"),
                              load_mask(single / "run" / "refine" / "pseudo" / f"{image_id}.png"))
    one = json.loads((single / "run" / "refine" / "metrics.json").read_text())
    two = json.loads((run_dir / "refine" / "metrics.json").read_text())
    assert two["miou"] == one["miou"] and two["per_class_iou"] == one["per_class_iou"]


def test_bad_input_under_torchrun_is_one_error_line(single):
    done = torchrun(single, single / "bad", "--set", "cam.train.batch_size=3")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: config key 'cam.train.batch_size' is 3: under torchrun it is shared by "
                      "2 processes, and each needs an equal share of at least 2"]
