import json

import pytest

from pipeline.core.cache import (
    StageOutput,
    cache_key,
    describe_changes,
    manifest_config,
    section_for_cache,
    stage_status,
    training_key,
    upstream_keys,
)
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
    assert "a 1 -> 2" in text and "cam output changed" in text and "data files changed" in text


def test_upstream_keys_require_a_finished_upstream(tmp_path):
    with pytest.raises(CacheError, match="--stages cam"):
        upstream_keys(tmp_path, ["cam"])
    with StageOutput(tmp_path, "cam", INPUTS):
        pass
    assert upstream_keys(tmp_path, ["cam"]) == {"cam": cache_key(INPUTS)}


def test_a_key_added_as_none_is_named_as_a_change():
    change = describe_changes({"config": {"data": {}}}, {"config": {"data": {"spacing": None}}})
    assert change == "data.spacing '(unset)' -> None"


def test_a_change_of_scoring_only_reuses_the_finished_outputs_and_keeps_the_training_key(tmp_path):
    trained = {**INPUTS, "version": 1, "scoring": {"config": {"cam.bg_threshold": 0.5}}}
    with StageOutput(tmp_path, "cam", trained) as out:
        assert not out.reused
        (out.dir / "model.pt").write_bytes(b"weights")
        out.metrics = {"miou": 0.5, "train_loss_by_epoch": [1.0, 0.5]}
    rescored = json.loads(json.dumps(trained))
    rescored["scoring"]["config"]["cam.bg_threshold"] = 0.3
    assert training_key(rescored) == training_key(trained) and cache_key(rescored) != cache_key(trained)
    status = stage_status(tmp_path, "cam", rescored)
    assert (status.state == "stale"
            and "only its scoring changed (cam.bg_threshold 0.5 -> 0.3)" in status.reason)
    with StageOutput(tmp_path, "cam", rescored) as out:
        assert out.reused and out.previous_metrics["train_loss_by_epoch"] == [1.0, 0.5]
        assert (out.dir / "model.pt").read_bytes() == b"weights"
        out.metrics = {"miou": 0.4, "train_loss_by_epoch": out.previous_metrics["train_loss_by_epoch"]}
    manifest = json.loads((tmp_path / "cam" / "manifest.json").read_text())
    assert (manifest["training_key"] == training_key(trained)
            and stage_status(tmp_path, "cam", rescored).state == "cached")
    assert upstream_keys(tmp_path, ["cam"]) == {"cam": training_key(trained)}  # downstream stays valid

    # A rescoring killed half-way resumes as a rescoring: the network is not trained again.
    again = json.loads(json.dumps(trained))
    with pytest.raises(KeyboardInterrupt):
        with StageOutput(tmp_path, "cam", again) as out:
            raise KeyboardInterrupt
    with StageOutput(tmp_path, "cam", again) as out:
        assert out.resumed and out.reused and out.previous_metrics["train_loss_by_epoch"] == [1.0, 0.5]
        out.metrics = {"miou": 0.5}

    retrained = {**rescored, "config": {**rescored["config"], "seed": 1}}
    with StageOutput(tmp_path, "cam", retrained) as out:
        assert not out.reused and not (out.dir / "model.pt").exists()


def test_force_reuses_nothing_of_the_finished_folder_nor_of_a_killed_rescoring(tmp_path):
    trained = {**INPUTS, "version": 1, "scoring": {"config": {"cam.bg_threshold": 0.5}}}
    with StageOutput(tmp_path, "cam", trained) as out:
        (out.dir / "model.pt").write_bytes(b"weights")
    with StageOutput(tmp_path, "cam", trained, reuse=False) as out:  # same key, --force
        assert not out.reused and not (out.dir / "model.pt").exists()
        (out.dir / "model.pt").write_bytes(b"new weights")
    rescored = {**trained, "scoring": {"config": {"cam.bg_threshold": 0.3}}}
    with pytest.raises(KeyboardInterrupt):
        with StageOutput(tmp_path, "cam", rescored) as out:
            assert out.reused
            raise KeyboardInterrupt
    with StageOutput(tmp_path, "cam", rescored, reuse=False) as out:
        assert not out.resumed and not out.reused and not (out.dir / "model.pt").exists()


def test_a_new_cache_version_makes_the_stage_stale_once_and_says_why(tmp_path):
    with StageOutput(tmp_path, "seg", {**INPUTS, "version": 1}):
        pass
    status = stage_status(tmp_path, "seg", {**INPUTS, "version": 2})
    assert status.state == "stale" and "cache version 1 -> 2 (a new release)" in status.reason


def test_recorded_config_merges_the_scoring_keys_back():
    manifest = {"inputs": {"config": {"data": {"root": "d"}, "seg": {"lr": 1}},
                           "scoring": {"config": {"data.val_split": "val", "seg.flip_predict": False}}}}
    assert manifest_config(manifest) == {"data": {"root": "d", "val_split": "val"},
                                         "seg": {"lr": 1, "flip_predict": False}}


def test_options_added_later_leave_no_trace_at_their_default():
    """A cam or seg cache made with SR on before detail_gate and detail_target existed keeps its
    key: at their defaults they are not in it; any other value is."""
    from pipeline.core.config_file import config_from_dict

    on = {"enabled": True}
    plain = section_for_cache(config_from_dict({"cam": {"sr": on}, "seg": {"sr": on}}), "cam", "seg")
    for section in ("cam", "seg"):
        assert plain[section]["sr"]["enabled"] is True
        assert "detail_gate" not in plain[section]["sr"] and "detail_target" not in plain[section]["sr"]
    gated = section_for_cache(config_from_dict({"cam": {"sr": on | {"detail_gate": "deep"}}}), "cam")
    assert gated["cam"]["sr"]["detail_gate"] == "deep"
    energy = section_for_cache(config_from_dict({"cam": {"sr": on | {"detail_target": "energy"}}}), "cam")
    assert energy["cam"]["sr"]["detail_target"] == "energy" and "detail_gate" not in energy["cam"]["sr"]
    # Training augmentations added later: the rotation of 0 draws nothing, so caches stay valid.
    assert "rotation" not in plain["seg"]["train"] and "rotation" not in plain["cam"]["train"]
    turned = section_for_cache(config_from_dict({"seg": {"train": {"rotation": 20}}}), "seg", "refine")
    assert turned["seg"]["train"]["rotation"] == 20 and "rotation" not in turned["refine"]["irn"]["train"]
    # DMPLS's term, added to mixed mode later: off (weight 0) it draws nothing and leaves no trace.
    assert "w_dmpls" not in section_for_cache(config_from_dict({}), "mixed")["mixed"]
    dmpls = section_for_cache(config_from_dict({"mixed": {"w_dmpls": 0.5}}), "mixed")
    assert dmpls["mixed"]["w_dmpls"] == 0.5
    # BCP's copy-paste, likewise: its section leaves no trace while it is off.
    assert "copy_paste" not in section_for_cache(config_from_dict({}), "mixed")["mixed"]
    bcp = section_for_cache(config_from_dict({"mixed": {"copy_paste": {"enabled": True}}}), "mixed")
    assert bcp["mixed"]["copy_paste"] == {"enabled": True, "u_weight": 0.5, "ema": 0.99, "start": 0.25}
