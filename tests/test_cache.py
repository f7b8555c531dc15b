import json

import pytest

from pipeline.core.cache import StageOutput, cache_key, describe_changes, stage_status, upstream_keys
from pipeline.core.errors import CacheError

INPUTS = {"config": {"seed": 0, "cam": {"lr": 0.1}}, "data_fingerprint": "abc", "upstream": {}}


def test_finished_stage_is_cached_and_a_config_change_makes_it_stale(tmp_path):
    with StageOutput(tmp_path, "cam", INPUTS) as out:
        (out.dir / "result.txt").write_text("done")
        out.metrics = {"miou": 0.5}
    assert (tmp_path / "cam" / "result.txt").read_text() == "done"
    manifest = json.loads((tmp_path / "cam" / "manifest.json").read_text())
    assert manifest["key"] == cache_key(INPUTS) and manifest["inputs"] == INPUTS
    assert json.loads((tmp_path / "cam" / "metrics.json").read_text())["miou"] == 0.5
    assert stage_status(tmp_path, "cam", INPUTS).state == "cached"

    changed = json.loads(json.dumps(INPUTS))
    changed["config"]["seed"] = 1
    status = stage_status(tmp_path, "cam", changed)
    assert status.state == "stale" and "seed 0 -> 1" in status.reason


def test_a_failing_stage_leaves_no_output_and_keeps_the_previous_one(tmp_path):
    with StageOutput(tmp_path, "cam", INPUTS) as out:
        (out.dir / "result.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with StageOutput(tmp_path, "cam", {**INPUTS, "data_fingerprint": "new"}) as out:
            (out.dir / "result.txt").write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "cam" / "result.txt").read_text() == "first"
    assert stage_status(tmp_path, "cam", INPUTS).state == "cached"
    assert not list(tmp_path.glob(".cam.*"))


def test_a_killed_stage_is_never_accepted_and_resumes_only_under_its_key(tmp_path):
    # What a SIGKILL leaves: the stage's partial folder with files but no rename to cam/.
    with pytest.raises(KeyboardInterrupt):
        with StageOutput(tmp_path, "cam", INPUTS) as out:
            assert not out.resumed
            (out.dir / "done-1.txt").write_text("kept")
            (out.dir / "manifest.json").write_text(json.dumps({"key": cache_key(INPUTS), "inputs": INPUTS}))
            raise KeyboardInterrupt
    assert stage_status(tmp_path, "cam", INPUTS).state == "missing"
    with pytest.raises(KeyboardInterrupt):
        with StageOutput(tmp_path, "cam", INPUTS) as out:
            assert out.resumed and (out.dir / "done-1.txt").read_text() == "kept"
            raise KeyboardInterrupt
    with StageOutput(tmp_path, "cam", {**INPUTS, "data_fingerprint": "changed"}) as out:
        assert not out.resumed and not (out.dir / "done-1.txt").exists()  # another key starts over
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == ["manifest.json", "metrics.json"]
    assert not list(tmp_path.glob(".cam.*"))


def test_unreadable_manifest_counts_as_missing(tmp_path):
    (tmp_path / "cam").mkdir()
    (tmp_path / "cam" / "manifest.json").write_text("{trunc")
    assert stage_status(tmp_path, "cam", INPUTS).state == "missing"


def test_change_descriptions_name_upstream_and_data():
    old = {"config": {"a": 1}, "data_fingerprint": "x", "upstream": {"cam": "k1"}}
    new = {"config": {"a": 2}, "data_fingerprint": "y", "upstream": {"cam": "k2"}}
    text = describe_changes(old, new)
    assert "config.a 1 -> 2" in text and "cam output changed" in text and "data files changed" in text


def test_upstream_keys_require_a_finished_upstream(tmp_path):
    with pytest.raises(CacheError, match="--stages cam"):
        upstream_keys(tmp_path, ["cam"])
    with StageOutput(tmp_path, "cam", INPUTS):
        pass
    assert upstream_keys(tmp_path, ["cam"]) == {"cam": cache_key(INPUTS)}


def test_a_key_added_as_none_is_named_as_a_change():
    change = describe_changes({"config": {"data": {}}}, {"config": {"data": {"spacing": None}}})
    assert change == "config.data.spacing '(unset)' -> None"
