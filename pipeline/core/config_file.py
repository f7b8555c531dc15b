"""Reading a YAML config and ``--set`` overrides into the schema of pipeline/core/config.py:
unknown keys, wrong types and values out of range are one-line ConfigErrors naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import BACKBONE_LEVELS, Config
from pipeline.core.errors import ConfigError


def load_config(path: str | Path, overrides: list[str] = (), mode: str | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for item in overrides:
        apply_override(raw, item)
    if mode is not None:
        raw["mode"] = mode
    return config_from_dict(raw)


def apply_override(raw: dict, item: str) -> None:
    """Applies one ``KEY=VALUE`` (dotted key, YAML value) to the raw config mapping."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set seg.train.epochs=2")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML") from None
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    if cfg.data.tags is not None and cfg.data.image_labels is not None:
        raise ConfigError("config keys 'data.tags' and 'data.image_labels' both give image labels: keep one")
    if cfg.data.volume_pattern is not None:
        try:
            re.compile(cfg.data.volume_pattern)
        except re.error as error:
            raise ConfigError("config key 'data.volume_pattern' is not a regular expression "
                              f"({error})") from None
    if cfg.data.spacing is not None and (len(cfg.data.spacing) != 3 or min(cfg.data.spacing) <= 0):
        raise ConfigError("config key 'data.spacing' must be 3 positive numbers: "
                          "[between slices, rows, columns]")
    if cfg.data.spacing is not None and cfg.data.spacing_file is not None:
        raise ConfigError("config keys 'data.spacing' and 'data.spacing_file' both give the spacing: "
                          "keep one")
    if ((cfg.data.spacing is not None or cfg.data.spacing_file is not None)
            and cfg.data.volume_pattern is None):
        raise ConfigError("config key 'data.spacing' or 'data.spacing_file' needs 'data.volume_pattern'")
    if cfg.demo is not None and cfg.demo.min_size > cfg.demo.max_size:
        raise ConfigError("demo.min_size must not exceed demo.max_size")
    for section, train in (("cam", cfg.cam.train), ("seg", cfg.seg.train),
                           ("refine.affinity", cfg.refine.affinity.train),
                           ("refine.irn", cfg.refine.irn.train)):
        scale_range = train.scale_range
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ConfigError(f"config key '{section}.train.scale_range' must be [low, high] "
                              "with 0 < low <= high")
        jitter = train.color_jitter
        if jitter and (len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5):
            raise ConfigError(f"config key '{section}.train.color_jitter' must be [] or "
                              "[brightness, contrast, saturation, hue], each >= 0, hue <= 0.5")
    # Fixed layers of a randomly initialised backbone would stay random: a config error, not a silent waste.
    affinity, irn = cfg.refine.affinity, cfg.refine.irn
    if (cfg.refine.method == "affinity" and affinity.backbone.weights is None
            and (affinity.freeze_batchnorm or affinity.frozen_levels)):
        raise ConfigError("config keys 'refine.affinity.freeze_batchnorm' and 'frozen_levels' fix layers "
                          "of a backbone without pretrained weights ('refine.affinity.backbone.weights' "
                          "is null): give weights, or set freeze_batchnorm: false and frozen_levels: []")
    if cfg.refine.method == "irn" and irn.backbone.weights is None and irn.freeze_backbone:
        raise ConfigError("config key 'refine.irn.freeze_backbone' fixes a backbone without pretrained "
                          "weights ('refine.irn.backbone.weights' is null): give weights, or set "
                          "freeze_backbone: false")
    _check_levels("refine.affinity.frozen_levels", cfg.refine.affinity.frozen_levels)
    powers = affinity.label_powers
    if len(powers) != 2 or not 0 < powers[0] < powers[1]:
        raise ConfigError("config key 'refine.affinity.label_powers' must be [low, high] with 0 < low < high "
                          "(the background (1 - max CAM)^power: strong at low, weak at high; PSA: [4, 32])")
    for section in ("cam", "seg"):
        exits = getattr(cfg, section).sr.exits
        _check_levels(f"{section}.sr.exits", exits)
        if len(set(exits)) != len(exits):
            raise ConfigError(f"config key '{section}.sr.exits' lists a level twice: {exits}")
        if getattr(cfg, section).sr.enabled and not exits:
            raise ConfigError(f"config key '{section}.sr.exits' must list at least one level "
                              "when SR is enabled")
    copy_paste = cfg.mode == "mixed" and cfg.mixed.copy_paste.enabled  # other modes never use it
    if copy_paste and cfg.mixed.weak_per_full != 1:
        raise ConfigError("config key 'mixed.copy_paste.enabled' pairs each full image with one weak "
                          "image, as BCP does: set mixed.weak_per_full: 1")
    if copy_paste and cfg.seg.sr.enabled:
        raise ConfigError("config key 'mixed.copy_paste.enabled' is not made for Self-Regulation's exits: "
                          "set seg.sr.enabled: false")
    if copy_paste and cfg.seg.train.batch_size % 4:
        raise ConfigError("config key 'mixed.copy_paste.enabled' pastes both ways between pairs of full "
                          "and weak images, two pairs at least: set seg.train.batch_size to a multiple of 4")
    if cfg.seg.sr.exit_classifier == "pooled":
        raise ConfigError("config key 'seg.sr.exit_classifier' is pooled, which needs one map per "
                          "foreground class: only the cam stage has that")
    if cfg.seg.sr.detail_gate != "none":
        raise ConfigError("config key 'seg.sr.detail_gate' gates Operation II on CAMs: "
                          "only the cam stage has them")
    if cfg.seg.sr.detail_target != "classes":
        raise ConfigError("config key 'seg.sr.detail_target' is energy, which is made for the cam stage's "
                          "exits (they learn no pixel labels): set seg.sr.detail_target: classes")
    if cfg.cam.sr.detail_target == "energy" and cfg.cam.sr.detail_gate != "none":
        raise ConfigError("config key 'cam.sr.detail_gate' gates the class maps' Operation II, which "
                          "cam.sr.detail_target: energy replaces: set one of them")
    if cfg.cam.sr.detail_gate != "none" and cfg.cam.sr.form != "hard":
        raise ConfigError("config key 'cam.sr.detail_gate' applies to Operation II's hard form: "
                          "set cam.sr.form: hard")
    if cfg.seg.loss != "cross_entropy" and cfg.seg.sr.enabled and cfg.mode != "mixed":
        raise ConfigError(f"config key 'seg.loss' is {cfg.seg.loss}, which Self-Regulation's exits do not "
                          "use: set seg.sr.enabled: false, or seg.loss: cross_entropy")
    if not cfg.cam.scales or any(s <= 0 for s in cfg.cam.scales):
        raise ConfigError("cam.scales must be a non-empty list of positive numbers")
    if cfg.refine.bg_threshold > cfg.refine.fg_threshold:
        raise ConfigError("refine.bg_threshold must not exceed refine.fg_threshold")
    if cfg.refine.random_walk.fg_bg_power > cfg.refine.random_walk.bg_bg_power:
        raise ConfigError("refine.random_walk.fg_bg_power must not exceed refine.random_walk.bg_bg_power")
    return cfg


def _build(cls, raw: Any, prefix: str, defaults=None):
    """``cls`` from its raw mapping; keys not given take ``defaults``' values, which for a nested
    section are its parent's defaults (e.g. ``seg.train.epochs`` is 20, not TrainConfig's 5)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a section of keys, got {raw!r}"
                          if prefix else f"the config must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"under '{prefix.rstrip('.')}'" if prefix else "at the top level"
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; keys {where}: {', '.join(fields)}")
    defaults = defaults if defaults is not None else cls()
    values = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            values[name] = getattr(defaults, name)
            continue
        values[name] = _coerce(hints[name], raw[name], key, getattr(defaults, name))
        _check(f.metadata, values[name], key)
    return cls(**values)


def _coerce(hint, value, key, default=None):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)][0]
        if value is None:
            return None
        # A nested optional section given as a mapping, e.g. ``demo:``; an empty mapping means defaults.
        return _coerce(inner, value, key, default)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", default)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list of {item_type.__name__}, got {value!r}")
        return [_coerce(item_type, v, key) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _check(metadata, value, key):
    if value is None:  # an optional key left unset
        return
    if "choices" in metadata and value not in metadata["choices"]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, metadata['choices']))}; "
                          f"got {value!r}")
    if "low" in metadata and value < metadata["low"]:
        raise ConfigError(f"config key '{key}' must be >= {metadata['low']}, got {value!r}")
    if "above" in metadata and value <= metadata["above"]:
        raise ConfigError(f"config key '{key}' must be > {metadata['above']}, got {value!r}")
    if "below" in metadata and value >= metadata["below"]:
        raise ConfigError(f"config key '{key}' must be < {metadata['below']}, got {value!r}")
    if "high" in metadata and value > metadata["high"]:
        raise ConfigError(f"config key '{key}' must be <= {metadata['high']}, got {value!r}")


def _check_levels(key: str, levels: list[str]) -> None:
    unknown = [level for level in levels if level not in BACKBONE_LEVELS]
    if unknown:
        raise ConfigError(f"config key '{key}' lists {unknown[0]!r}; levels are {', '.join(BACKBONE_LEVELS)}")
