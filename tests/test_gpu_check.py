"""tools/gpu_check.py: the GPU check, run here on the CPU at tiny size."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "tools" / "gpu_check.py")


def run_tool(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, TOOL, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.e2e
def test_tiny_run_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    done = run_tool("--device", "cpu", "--tiny", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["tiny"] is True
    assert report["command"] == f"python tools/gpu_check.py --device cpu --tiny --out {out}"
    (run,) = report["runs"]
    assert run["device"] == "cpu"
    assert run["amp"]["dtype"] == "off (float32)"  # auto is off on the CPU
    assert list(run["stages"]) == ["cam", "refine", "seg"]
    for name, stage in run["stages"].items():
        assert stage["images_per_s"] > 0, name
        assert stage["wall_s"] > 0, name
        assert 0.0 <= stage["miou"] <= 1.0, name
        assert stage["peak_gpu_memory_mib"] is None, name
    for name in ("cam", "seg"):  # the training timed apart: 16 train images, batch 4, 1 epoch
        stage = run["stages"][name]
        assert stage["images_per_s_basis"].startswith("training")
        assert (stage["epochs"], stage["train_steps"], stage["train_images"]) == (1, 4, 16)
        assert 0 < stage["train_s"] < stage["wall_s"]
    assert run["stages"]["cam"]["inferred_images"] == 16 and run["stages"]["refine"]["inferred_images"] == 16
    assert run["stages"]["seg"]["inferred_images"] == 8
    assert Path(run["run_dir"]).is_dir() and (out / "data" / "demo-tiny").is_dir()
    table = (out / "gpu_check.md").read_text()
    assert "| cpu | seg (val) |" in table and "| n/a |" in table
    assert report["date"] in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_cuda_without_a_device_is_a_one_line_error(tmp_path):
    done = run_tool("--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == "error: no CUDA device (torch.cuda.is_available() is False)\n"
    assert not (tmp_path / "out").exists()


def load_tool():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_stage(wall, images_per_s, memory, miou):
    return {"wall_s": wall, "call_s": wall + 1, "miou": miou, "scored_on": "train", "inferred_images": 10,
            "peak_gpu_memory_mib": memory, "peak_gpu_memory_reserved_mib": memory,
            "images_per_s": images_per_s,
            "images_per_s_basis": "training: images x epochs / training seconds", "train_s": wall / 2,
            "inference_images_per_s": 3.0}


def test_the_markdown_of_a_gpu_run_beside_a_cpu_run():
    """What only a GPU machine reaches (memory peaks, CUDA start, the speed ratio), on made-up numbers."""
    tool = load_tool()
    runs = [{"device": device, "run_dir": f"runs/gpu-check/runs/x-{device}", "num_threads": 2, "total_s": 9.0,
             "amp": {"setting": {"cam": "auto", "seg": "auto"}, "dtype": dtype},
             "stages": {name: fake_stage(wall, speed, memory, 0.3) for name in tool.STAGES}}
            for device, dtype, wall, speed, memory in (("cuda", "bfloat16", 2.0, 100.0, 812.25),
                                                       ("cpu", "off (float32)", 10.0, 20.0, None))]
    runs[0]["cuda_init_s"] = 1.5
    speedup = tool.speedup(runs)
    assert speedup["seg"] == {"wall_time": 5.0, "images_per_s": 5.0}
    report = {"command": "python tools/gpu_check.py --also-cpu", "date": "2030-01-01T00:00:00+00:00",
              "commit": "abc", "tiny": False, "runs": runs, "speedup": speedup,
              "machine": {"gpu": "NVIDIA H100", "gpu_memory_gib": 79.1, "cpu": "x", "cpu_cores": 16,
                          "python": "3.11", "torch": "2", "cuda": "12", "cudnn": 9}}
    table = tool.markdown(report)
    assert "on NVIDIA H100" in table and "after 1.5 s of CUDA start" in table and "-> bfloat16" in table
    assert "| cuda | cam (train) | 2.0 | 100.0 | 3.0 | 1.0 | 812 | 30.00 |" in table
    assert "| cpu | cam (train) | 10.0 | 20.0 | 3.0 | 5.0 | n/a | 30.00 |" in table
    assert "| seg | 5.0x | 5.0x |" in table
