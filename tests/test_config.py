import pytest
from conftest import DEMO_CONFIG

from pipeline.core.cache import section_for_cache
from pipeline.core.config_file import apply_override, config_from_dict, load_config
from pipeline.core.errors import ConfigError


def test_demo_config_loads_and_overrides_apply(tmp_path):
    cfg = load_config(DEMO_CONFIG, ["seed=3", "seg.train.epochs=2", "cam.scales=[1.0, 0.5]"], mode="full")
    assert cfg.seed == 3 and cfg.seg.train.epochs == 2 and cfg.cam.scales == [1.0, 0.5] and cfg.mode == "full"
    assert cfg.cam.backbone.name == "resnet18"


def test_unknown_key_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"cam": {"train": {"epoch": 3}}})
    message = str(error.value)
    assert "cam.train.epoch" in message and "epochs" in message and "\n" not in message


@pytest.mark.parametrize("raw, key", [
    ({"seed": "zero"}, "seed"),
    ({"cam": {"flip": "yes"}}, "cam.flip"),
    ({"seg": {"train": {"lr": [1]}}}, "seg.train.lr"),
    ({"cam": {"scales": 1.0}}, "cam.scales"),
    ({"refine": {"crf": 3}}, "refine.crf"),
    ({"cam": {"backbone": {"name": "vgg"}}}, "cam.backbone.name"),
    ({"refine": {"fg_threshold": 1.5}}, "refine.fg_threshold"),
    ({"seg": {"train": {"batch_size": 1}}}, "seg.train.batch_size"),
    ({"mode": "semi"}, "mode"),
    ({"seed": -1}, "seed"),
    ({"demo": {"seed": 2**32}}, "demo.seed"),
    ({"refine": {"crf": {"gt_prob": 1.0}}}, "refine.crf.gt_prob"),
    ({"refine": {"crf": {"bilateral_srgb": 0}}}, "refine.crf.bilateral_srgb"),
])
def test_wrong_values_are_one_line_errors_naming_the_key(raw, key):
    with pytest.raises(ConfigError) as error:
        config_from_dict(raw)
    assert f"'{key}'" in str(error.value)


def test_bool_is_not_accepted_as_a_number():
    with pytest.raises(ConfigError):
        config_from_dict({"seed": True})


def test_int_is_accepted_where_a_float_is_expected():
    assert config_from_dict({"cam": {"train": {"lr": 1}}}).cam.train.lr == 1.0


def test_override_parsing():
    raw = {"seg": {"train": {}}}
    apply_override(raw, "seg.train.scale_range=[0.5, 2]")
    apply_override(raw, "demo.seed=4")
    assert raw == {"seg": {"train": {"scale_range": [0.5, 2]}}, "demo": {"seed": 4}}
    with pytest.raises(ConfigError):
        apply_override(raw, "seed")
    with pytest.raises(ConfigError, match="seg.train.scale_range is a value"):
        apply_override(raw, "seg.train.scale_range.low=1")


def test_cross_key_checks():
    with pytest.raises(ConfigError, match="refine.bg_threshold"):
        config_from_dict({"refine": {"fg_threshold": 0.1, "bg_threshold": 0.2}})
    with pytest.raises(ConfigError, match="scale_range"):
        config_from_dict({"cam": {"train": {"scale_range": [1.5, 0.5]}}})


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_execution_only_keys_stay_out_of_cache_sections():
    cfg = config_from_dict({"refine": {"workers": 7}, "data": {"loader_workers": 3}})
    picked = section_for_cache(cfg, "data", "refine")
    assert "workers" not in picked["refine"]
    # loader workers draw their own augmentation seeds, so they change the model: keyed
    assert picked["data"]["loader_workers"] == 3
    assert "fg_threshold" in picked["refine"]


def test_a_partly_given_section_keeps_its_parents_defaults():
    cfg = config_from_dict({"seg": {"train": {"lr": 0.1}, "backbone": {"output_stride": 8}},
                            "cam": {"train": {}}})
    assert cfg.seg.train.lr == 0.1 and cfg.seg.train.epochs == 20 and cfg.seg.train.crop_size == 512
    assert cfg.seg.backbone.name == "resnet101" and cfg.seg.backbone.output_stride == 8
    assert cfg.cam.train == config_from_dict({}).cam.train
    assert config_from_dict({"demo": {}}).demo.num_train == 400


def test_a_disabled_feature_stays_out_of_cache_sections():
    off = section_for_cache(config_from_dict({"cam": {"sr": {"w_sf": 0.5}}}), "cam")
    assert "sr" not in off["cam"] and "recam" not in off["cam"]  # a new feature, off, keeps old keys
    assert off == section_for_cache(config_from_dict({}), "cam")
    on = section_for_cache(config_from_dict({"cam": {"sr": {"enabled": True, "w_sf": 0.5}}}), "cam")
    assert on["cam"]["sr"]["w_sf"] == 0.5


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_infinity_are_rejected_in_every_numeric_key(value):
    with pytest.raises(ConfigError, match="config key 'cam.train.lr' must be a finite number"):
        load_config(DEMO_CONFIG, [f"cam.train.lr={value}"])
    with pytest.raises(ConfigError, match="config key 'cam.scales' must be a finite number"):
        load_config(DEMO_CONFIG, [f"cam.scales=[1.0, {value}]"])


def test_exponent_notation_without_a_dot_is_a_number():
    assert load_config(DEMO_CONFIG, ["cam.train.lr=1e-3"]).cam.train.lr == 0.001
    with pytest.raises(ConfigError, match="config key 'cam.train.lr' must be a number, got 'fast'"):
        load_config(DEMO_CONFIG, ["cam.train.lr=fast"])


def test_every_training_key_is_in_the_cache_key_at_every_value():
    # No key is left out at its default to keep older caches valid: the stage's cache version
    # makes those stale once instead.
    plain = section_for_cache(config_from_dict({}), "cam")["cam"]["train"]
    assert plain["steps"] == 0 and plain["color_jitter"] == [] and plain["amp"] == "auto"
    affinity = section_for_cache(config_from_dict({}), "refine")["refine"]["affinity"]
    assert affinity["frozen_levels"] == ["stem", "layer1"] and affinity["freeze_batchnorm"] is True
    tuned = config_from_dict({"cam": {"train": {"steps": 100, "color_jitter": [0.3, 0.3, 0.3, 0.1]}}})
    assert section_for_cache(tuned, "cam")["cam"]["train"]["steps"] == 100
    assert section_for_cache(tuned, "cam")["cam"]["train"]["color_jitter"] == [0.3, 0.3, 0.3, 0.1]


@pytest.mark.parametrize("key, value", [("refine.affinity.radius", 1), ("refine.random_walk.radius", 1),
                                        ("refine.irn.radius", 1), ("cam.train.color_jitter", [0.3, 0.3]),
                                        ("refine.affinity.frozen_levels", ["stem", "layer9"]),
                                        ("refine.affinity.label_powers", [32, 4]),
                                        ("refine.affinity.label_powers", [4])])
def test_settings_that_cannot_work_are_config_errors(key, value):
    tree = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(tree)


def test_the_dice_loss_with_self_regulation_outside_mixed_mode_is_a_config_error():
    dice = {"seg": {"loss": "cross_entropy_dice", "sr": {"enabled": True}}}
    with pytest.raises(ConfigError, match=r"'seg\.loss' is cross_entropy_dice"):
        config_from_dict(dice | {"mode": "full"})
    config_from_dict(dice | {"mode": "mixed"})  # the teacher's term is not SR's
    config_from_dict({"mode": "full", "seg": {"loss": "cross_entropy_dice"}})


def test_copy_paste_needs_one_weak_image_per_full_image_no_sr_and_two_pairs():
    on, mixed = {"copy_paste": {"enabled": True}}, {"mode": "mixed"}
    with pytest.raises(ConfigError, match=r"set mixed\.weak_per_full: 1"):
        config_from_dict(mixed | {"mixed": on | {"weak_per_full": 2}})
    with pytest.raises(ConfigError, match=r"set seg\.sr\.enabled: false"):
        config_from_dict(mixed | {"mixed": on, "seg": {"sr": {"enabled": True}}})
    for batch_size in (2, 6):
        with pytest.raises(ConfigError, match=r"batch_size to a multiple of 4"):
            config_from_dict(mixed | {"mixed": on, "seg": {"train": {"batch_size": batch_size}}})
    config_from_dict(mixed | {"mixed": on})
    # off: unchecked
    config_from_dict(mixed | {"mixed": {"weak_per_full": 2}, "seg": {"sr": {"enabled": True}}})
    config_from_dict({"mixed": on, "seg": {"sr": {"enabled": True}}})  # weak mode never uses it


def test_fixing_layers_of_a_backbone_without_pretrained_weights_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'refine\.affinity\.backbone\.weights' is null"):
        config_from_dict({"refine": {"method": "affinity"}})
    with pytest.raises(ConfigError, match=r"'refine\.irn\.backbone\.weights' is null"):
        config_from_dict({"refine": {"method": "irn"}})
    config_from_dict({"refine": {"method": "crf"}})  # the sections of another method are not checked
    config_from_dict({"refine": {"method": "affinity",
                                 "affinity": {"freeze_batchnorm": False, "frozen_levels": []}}})
    config_from_dict({"refine": {"method": "irn", "irn": {"freeze_backbone": False}}})
    load_config(DEMO_CONFIG, ["refine.method=irn"])
    load_config(DEMO_CONFIG, ["refine.method=affinity"])


def test_mixed_precision_is_off_on_the_cpu_and_fp16_needs_cuda():
    import torch

    from pipeline.core.training import amp_dtype
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", cpu) is None
    assert amp_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="'train.amp' is fp16"):
        amp_dtype("fp16", cpu)


def test_every_refine_method_the_config_accepts_has_a_module():
    import dataclasses

    from pipeline.core.config import RefineConfig
    from pipeline.refinement import METHODS
    choices = next(f for f in dataclasses.fields(RefineConfig) if f.name == "method").metadata["choices"]
    assert sorted(choices) == sorted(METHODS)


def test_refine_cache_key_holds_the_two_thresholds_or_the_rule_that_replaces_them():
    from pipeline.refinement import method_for
    fixed = method_for(config_from_dict({})).cache_config()["refine"]
    # The default rule leaves no trace: keys made before it existed stay valid.
    assert "thresholds" not in fixed and fixed["fg_threshold"] == 0.30
    otsu = method_for(config_from_dict({"refine": {"thresholds": "otsu"}})).cache_config()
    assert otsu["refine"]["thresholds"] == "otsu" and otsu["refine"]["fg_threshold"] == 0.30
    # PSA's own pair labels read neither the thresholds nor the rule.
    psa = method_for(config_from_dict({"refine": {"method": "affinity", "thresholds": "otsu", "affinity": {
        "freeze_batchnorm": False, "frozen_levels": []}}}))
    assert not psa.uses_thresholds()
    assert not {"thresholds", "fg_threshold", "bg_threshold"} & set(psa.cache_config()["refine"])


def test_region_snapping_is_in_refines_key_when_on_and_never_in_a_walk_networks_key():
    from pipeline.refinement import method_for
    assert "regions" not in method_for(config_from_dict({})).cache_config()["refine"]  # off: no trace
    on = {"refine": {"regions": {"enabled": True, "scale": 200}}}
    assert method_for(config_from_dict(on)).cache_config()["refine"]["regions"]["scale"] == 200
    # with each walk's backbone unfrozen: its fixed layers need weights, none here
    unfrozen = {"irn": {"freeze_backbone": False},
                "affinity": {"freeze_batchnorm": False, "frozen_levels": []}}
    for method, network in unfrozen.items():
        walk = method_for(config_from_dict({"refine": {**on["refine"], "method": method, method: network}}))
        inputs = {"config": walk.cache_config()}
        assert "regions" in inputs["config"]["refine"]
        assert "regions" not in walk.network_inputs(inputs)["config"]["refine"]
