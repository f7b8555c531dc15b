"""docs/config-reference.md is generated from the config schema: it must match what
tools/config_reference.py writes now, and a field added to a schema dataclass shows up."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and inspect look a class's module up by name
    spec.loader.exec_module(module)
    return module


config_reference = _load("config_reference_tool", ROOT / "tools" / "config_reference.py")


def test_reference_is_up_to_date():
    written = (ROOT / "docs" / "config-reference.md").read_text()
    assert written == config_reference.generate(), (
        "docs/config-reference.md is out of date: run python tools/config_reference.py")


def test_check_option(tmp_path, capsys):
    out = tmp_path / "reference.md"
    assert config_reference.main(["--check", "--out", str(out)]) == 1  # missing
    assert "out of date" in capsys.readouterr().err
    assert config_reference.main(["--out", str(out)]) == 0
    assert config_reference.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    assert config_reference.main(["--check", "--out", str(out)]) == 1


def test_effective_nested_defaults():
    """Sections take their defaults from their parent (seg.train is not TrainConfig()): the
    reference shows what config_from_dict({}) gives."""
    from pipeline.core.config import DemoConfig, TrainConfig
    from pipeline.core.config_file import config_from_dict

    text = config_reference.generate()
    cfg = config_from_dict({})
    differing = [(f"{section}.train.{name}", value) for section, train in (("seg", cfg.seg.train),
                                                                         ("refine.irn", cfg.refine.irn.train))
                 for name, value in vars(train).items() if value != getattr(TrainConfig(), name)]
    assert differing
    for key, value in differing:
        assert f"| `{key}` | `{config_reference._value(value)}` |" in text
    # An optional section, off by default: its defaults when it is given.
    assert cfg.demo is None
    assert f"| `demo.num_train` | `{DemoConfig().num_train}` | integer, ≥ 1 |" in text
    assert "| `cam.backbone.name` | `" + cfg.cam.backbone.name + "` | one of `resnet18`," in text


SCHEMA = '''
from dataclasses import dataclass, field
from typing import Optional


def _opt(default, **checks):
    return field(default=default, metadata=checks)


@dataclass
class Inner:
    """An inner section."""
    # the rate,
    # in two lines
    rate: float = _opt(0.5, above=0.0, below=1.0)  # and a trailing comment
    kind: str = _opt("a", choices=("a", "b"))


@dataclass
class Outer:
    seed: int = _opt(0, low=0)  # the seed
    inner: Inner = field(default_factory=lambda: Inner(rate=0.25))  # nested, its own default
    extra: Optional[Inner] = None
'''

NEW_FIELD = '''    kind: str = _opt("a", choices=("a", "b"))
    # A new key, described by its comment.
    added: list[int] = field(default_factory=lambda: [1, 2])
'''


def test_generated_from_a_small_schema(tmp_path):
    path = tmp_path / "small_schema.py"
    path.write_text(SCHEMA)
    module = _load("small_schema", path)
    text = config_reference.render(config_reference.sections(module.Outer), header="# Small\n")
    assert "## `inner`" in text and "## `extra`" in text
    assert "An inner section." in text
    assert "| `seed` | `0` | integer, ≥ 0 | the seed |" in text
    assert ("| `inner.rate` | `0.25` | number, > 0.0 and &lt; 1.0 "
            "| the rate, in two lines and a trailing comment |") in text
    assert "| `extra.rate` | `0.5` |" in text  # the optional section's defaults when given
    assert "| `inner.kind` | `a` | one of `a`, `b` |" in text
    assert "added" not in text

    path.write_text(SCHEMA.replace('    kind: str = _opt("a", choices=("a", "b"))\n', NEW_FIELD))
    module = _load("small_schema", path)
    text = config_reference.render(config_reference.sections(module.Outer), header="# Small\n")
    assert "| `inner.added` | `[1, 2]` | list of integers | A new key, described by its comment. |" in text
    assert "| `extra.added` | `[1, 2]` |" in text
