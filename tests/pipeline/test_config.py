from dataclasses import dataclass, field

import pytest

from pipeline.config import ConfigError, from_dict, load_config
from preprocessing.synth import SynthConfig
from tests.conftest import REPO_ROOT


@dataclass(frozen=True)
class Inner:
    rate: float = 0.1
    name: str = "x"


@dataclass(frozen=True)
class Outer:
    steps: int
    inner: Inner = field(default_factory=Inner)
    pair: tuple[float, float] = (0.0, 1.0)
    tag: str | None = None


def test_nested_values_and_defaults():
    config = from_dict(Outer, {"steps": 3, "inner": {"rate": 2}, "pair": [1, 2.5]})
    assert config == Outer(steps=3, inner=Inner(rate=2.0), pair=(1.0, 2.5))
    assert isinstance(config.inner.rate, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"steps": 1, "inner": {"rte": 1.0}}, "unknown key 'inner.rte'"),
        ({"steps": "3"}, "'steps' must be int, got '3'"),
        ({"steps": True}, "'steps' must be int, got True"),
        ({"steps": 1, "pair": [1.0]}, "'pair' must hold 2 values, got 1"),
        ({"steps": 1, "inner": {"rate": "fast"}}, "'inner.rate' must be a number"),
        ({}, "required key 'steps' is missing"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=f"^cfg.yaml: {message}"):
        from_dict(Outer, data, source="cfg.yaml")


def test_yaml_file_with_overrides_and_validation(tmp_path):
    path = tmp_path / "synth.yaml"
    path.write_text("layout: aflw2000-3d\nn: 5\n")
    assert load_config(path, SynthConfig, {"seed": 7}) == SynthConfig("aflw2000-3d", 5, seed=7)
    path.write_text("layout: aflw2000-3d\nn: -1\n")
    with pytest.raises(ConfigError, match="synth.yaml: SynthConfig: n must be >= 1, got -1"):
        load_config(path, SynthConfig)
    path.write_text("layout: [unclosed\n")
    with pytest.raises(ConfigError, match="synth.yaml: not valid YAML"):
        load_config(path, SynthConfig)


def test_shipped_synth_config_loads():
    config = load_config(REPO_ROOT / "configs" / "synth.yaml", SynthConfig)
    assert config.layout == "300w-lp" and config.flip
