"""Settings are checked when they are read: every number of every config dataclass has a declared
range (NaN and inf never pass), every name that becomes a file, folder or MLflow name keeps to a
safe character set, and config files, command-line overrides and Tune search spaces meet the same
rules, each refusal one line naming the file (or the command line) and the dotted key."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import train, tune
from pipeline.runtime.config import ConfigError, Name, Range, load_config
from pipeline.sweeps.config import (
    NOT_SEARCHABLE,
    SearchSpace,
    SpaceSettings,
    SweepConfig,
    leaf_keys,
    load_space,
)
from pipeline.training.config import TrainConfig
from preprocessing.augment import AugmentConfig, GeometricConfig, PhotometricConfig
from preprocessing.dataflow import PreprocessConfig
from preprocessing.synth import SynthConfig
from tests.conftest import REPO_ROOT

# The config dataclasses every stage reads from files (a space file's keys besides `space`
# included); a dataclass added under them (PreprocessConfig's `augment`) is walked too.
CONFIG_ROOTS = (TrainConfig, SweepConfig, SpaceSettings, SynthConfig, PreprocessConfig)
# Keys whose value becomes a file, folder or MLflow name.
NAME_WORDS = ("name", "experiment", "registered_model")
SCALARS = (int, float, str)


@dataclass(frozen=True)
class Leaf:
    """One numeric or string value a config holds: its dotted key as errors name it, where it
    sits in the YAML (``data`` builds the mapping that sets it), its type and its rules."""

    key: str
    path: tuple[str, ...]
    wrap: str  # "" (the value itself), "list" (a list of `count` values) or "dict" ({slot: value})
    kind: type
    rules: tuple[Any, ...]
    count: int = 1

    def data(self, value: Any) -> dict[str, Any]:
        inner = {"": value, "list": [value] * self.count, "dict": {"slot": value}}[self.wrap]
        for part in reversed(self.path):
            inner = {part: inner}
        return inner

    @property
    def range(self) -> Range | None:
        return next((rule for rule in self.rules if isinstance(rule, Range)), None)


def leaves(cls: type, path: tuple[str, ...] = ()) -> list[Leaf]:
    """Every int, float and str value of a config dataclass, nested ones, tuple elements and
    mapping values included."""
    found = []
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        here = (*path, name)
        if dataclasses.is_dataclass(hint):
            found += leaves(hint, here)
        else:
            found += _leaf(".".join(here), here, "", hint)
    return found


def _leaf(key: str, path: tuple[str, ...], wrap: str, hint: Any, count: int = 1) -> list[Leaf]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return [Leaf(key, path, wrap, args[0], hint.__metadata__, count)] if args[0] in SCALARS else []
    if origin in (typing.Union, types.UnionType):
        options = [option for option in args if option is not type(None)]
        return [leaf for option in options for leaf in _leaf(key, path, wrap, option)]
    if origin is tuple:  # tuple[X, ...] or tuple[X, X]: every element set alike, the first named
        return _leaf(f"{key}[0]", path, "list", args[0], 1 if args[-1] is Ellipsis else len(args))
    if origin is dict:
        return _leaf(f"{key}.slot", path, "dict", args[1])
    return [Leaf(key, path, wrap, hint, (), count)] if hint in SCALARS else []


def numeric(cls: type) -> list[Leaf]:
    return [leaf for leaf in leaves(cls) if leaf.kind in (int, float)]


def base_data(cls: type) -> dict[str, Any]:
    return {"layout": "300w-lp", "n": 4} if cls is SynthConfig else {}


def refused(path: Path, cls: type, data: dict[str, Any]) -> str:
    """The one-line ConfigError loading ``data`` from ``path`` gives."""
    path.write_text(yaml.safe_dump({**base_data(cls), **data}))
    with pytest.raises(ConfigError) as caught:
        load_config(path, cls)
    message = str(caught.value)
    assert "\n" not in message
    return message


def names(cls: type) -> list[Leaf]:
    return [leaf for leaf in leaves(cls) if leaf.kind is str and any(w in leaf.path[-1] for w in NAME_WORDS)]


def every(select) -> list[pytest.param]:
    """``select``'s leaves of every config root, as test parameters named by class and key."""
    pairs = [(cls, leaf) for cls in CONFIG_ROOTS for leaf in select(cls)]
    return [pytest.param(cls, leaf, id=f"{cls.__name__}.{leaf.key}") for cls, leaf in pairs]


def test_every_numeric_field_declares_a_range():
    """A field added later without a declared range fails here."""
    found = [(cls.__name__, leaf) for cls in CONFIG_ROOTS for leaf in numeric(cls)]
    missing = [f"{owner}.{leaf.key}" for owner, leaf in found if leaf.range is None]
    assert not missing, f"numeric config fields without a Range in their annotation: {missing}"
    assert len(found) >= 66  # the walk reaches them all


@pytest.mark.parametrize(("cls", "leaf"), every(numeric))
def test_nan_inf_and_values_outside_the_range_are_refused_by_key(cls, leaf, tmp_path):
    path = tmp_path / "settings.yaml"
    where = f"{path}: '{leaf.key}' must be "
    for bad in (math.nan, math.inf, -math.inf):
        message = refused(path, cls, leaf.data(bad))
        expected = "int" if leaf.kind is int else f"a finite number {leaf.range.describe()}"
        assert message == f"{where}{expected}, got {bad!r}"
    rule = leaf.range
    outside = [just_outside(leaf, rule.ge, -1), rule.gt, just_outside(leaf, rule.le, +1), rule.lt]
    outside = [leaf.kind(value) for value in outside if value is not None]
    assert outside, f"{leaf.key}: a range with no bound"
    for value in outside:
        message = refused(path, cls, leaf.data(value))  # "..., got 0" or "... or null, got 0"
        assert message.startswith(f"{where}{rule.refusal(value)}") and message.endswith(f", got {value!r}")
    for inside in (bound for bound in (rule.ge, rule.le) if bound is not None):  # inclusive bounds pass
        path.write_text(yaml.safe_dump({**base_data(cls), **leaf.data(leaf.kind(inside))}))
        load_config(path, cls)


# The preprocessing stages' configs are also built in code (benchmarks, the demo): there each one
# checks its own fields against the same rules and names the field.
BUILT_IN_CODE = (SynthConfig, PreprocessConfig, AugmentConfig, GeometricConfig, PhotometricConfig)


@pytest.mark.parametrize(("cls", "leaf"), [pytest.param(cls, leaf, id=f"{cls.__name__}.{leaf.key}")
                                           for cls in BUILT_IN_CODE for leaf in numeric(cls)
                                           if len(leaf.path) == 1])
def test_configs_built_in_code_meet_the_same_ranges(cls, leaf):
    rule = leaf.range
    outside = [just_outside(leaf, rule.ge, -1), rule.gt, just_outside(leaf, rule.le, +1), rule.lt]
    bad_values = [leaf.kind(value) for value in outside if value is not None]
    bad_values += [math.nan] if leaf.kind is float else []
    for bad in bad_values:
        value = (bad,) * leaf.count if leaf.wrap == "list" else bad
        with pytest.raises(ValueError) as caught:
            cls(**{**base_data(cls), leaf.path[0]: value})
        assert str(caught.value) == f"{leaf.key} must be {rule.refusal(bad)}, got {bad!r}"


def just_outside(leaf: Leaf, bound: float | None, direction: int) -> float | None:
    """The value next to an inclusive bound, on the refused side."""
    if bound is None:
        return None
    return bound + direction if leaf.kind is int else math.nextafter(bound, direction * math.inf)


def test_the_reported_failures_stop_at_load(tmp_path):
    """The settings that used to fail after an epoch or a minute of start-up."""
    path = tmp_path / "train.yaml"
    cases = [(TrainConfig, "scaling: {num_workers: 0}", "'scaling.num_workers' must be >= 1, got 0"),
             (TrainConfig, "scaling: {cpus_per_worker: 0}",
              "'scaling.cpus_per_worker' must be a finite number > 0, got 0.0"),
             (TrainConfig, "run: {keep_checkpoints: 0}", "'run.keep_checkpoints' must be >= 1, got 0"),
             (TrainConfig, "loss: {num_resampled: -1}", "'loss.num_resampled' must be >= 0, got -1"),
             (TrainConfig, "optim: {lr: .nan}", "'optim.lr' must be a finite number > 0, got nan"),
             (SweepConfig, "trial: {cpus_per_worker: 0}",
              "'trial.cpus_per_worker' must be a finite number > 0, got 0.0"),
             (PreprocessConfig, "val_fraction: 1.0",
              "'val_fraction' must be a finite number in [0, 1), got 1.0"),
             (PreprocessConfig, "augment: {copies: 0}", "'augment.copies' must be >= 1, got 0"),
             (PreprocessConfig, "augment: {geometric: {flip_probability: 1.5}}",
              "'augment.geometric.flip_probability' must be a finite number in [0, 1], got 1.5"),
             (SynthConfig, "{layout: 300w, n: 4}",
              "'layout' must be one of ['300w-lp', 'aflw2000-3d'], got '300w'"),
             (SynthConfig, "{layout: 300w-lp, n: 4, face_width_px: [230, 150]}",
              "SynthConfig: face_width_px must be [low, high] with low <= high, got [230.0, 150.0]")]
    for cls, text, message in cases:
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_config(path, cls)
        assert str(caught.value) == f"{path}: {message}"


BAD_NAMES = ["../../x", "a/b", "a\\b", ".hidden", "-flag", "a..b", "", "x" * 129, "naïve", "a b", "a\nb"]


@pytest.mark.parametrize(("cls", "leaf"), every(names))
def test_every_name_keeps_to_the_safe_set(cls, leaf, tmp_path):
    """run.name, mlflow.experiment, mlflow.registered_model and the sweep name: path separators,
    '..', a leading '.' or '-', other characters and over-long names are refused, by file and key."""
    rule = next((r for r in leaf.rules if isinstance(r, Name)), None)
    assert rule is not None, f"{cls.__name__}.{leaf.key} becomes a name but has no Name rule"
    path = tmp_path / "settings.yaml"
    for bad in [*BAD_NAMES, "y" * (rule.max_length + 1)]:
        message = refused(path, cls, leaf.data(bad))
        assert message == (f"{path}: '{leaf.key}' must be a name of letters, digits, '.', '_' and '-' that "
                           f"starts with a letter or digit, has no '..' and is at most {rule.max_length} "
                           f"characters, got {bad!r}")
    for good in ("mobile-frnet", "run_1.2", "A", "z" * rule.max_length):
        path.write_text(yaml.safe_dump(leaf.data(good)))
        load_config(path, cls)


def test_overrides_meet_the_same_rules_and_are_named_as_the_command_lines():
    config = REPO_ROOT / "configs" / "train.yaml"
    for key, value, message in (("epochs", 0, "'epochs' must be >= 1, got 0"),
                                ("optim.lr", math.nan, "'optim.lr' must be a finite number > 0, got nan"),
                                ("run.name", "../x", "'run.name' must be a name of")):
        with pytest.raises(ConfigError, match=f"^command line: {message}"):
            load_config(config, TrainConfig, {key: value})
    with pytest.raises(ConfigError, match="^command line: 'epochs' must be >= 1, got -3$"):
        load_config(REPO_ROOT / "configs" / "tune.yaml", SweepConfig, {"epochs": -3})


def searchable_numbers() -> list[Leaf]:
    def banned(key: str) -> bool:
        return any(key == item or (item.endswith(".") and key.startswith(item)) for item in NOT_SEARCHABLE)

    return [leaf for leaf in numeric(TrainConfig) if leaf.wrap == "" and not banned(leaf.key)]


@pytest.mark.parametrize("leaf", searchable_numbers(), ids=lambda leaf: leaf.key)
def test_every_value_a_space_can_produce_meets_the_keys_range(leaf, tmp_path):
    """choice and grid members, uniform and loguniform bounds, randint's ends: the range of the
    training key they name (NaN never), with the space file and the key in the message."""
    path = tmp_path / "space.yaml"
    rule = leaf.range
    default = TrainConfig()
    for part in leaf.path:
        default = getattr(default, part)
    below = just_outside(leaf, rule.ge, -1) if rule.ge is not None else rule.gt
    above = just_outside(leaf, rule.le, +1) if rule.le is not None else rule.lt
    outside = [leaf.kind(value) for value in (below, above) if value is not None]
    bad_values = [*outside, math.nan] if leaf.kind is float else outside
    specs = [{"distribution": kind, "values": [default, bad]}
             for bad in bad_values for kind in ("choice", "grid")]
    pairs = [(below, default), (default, above)]  # the other bound the key's default, so allowed
    if leaf.kind is float:
        specs += [{"distribution": "uniform", "low": low, "high": high} for low, high in pairs
                  if None not in (low, high)]
    if leaf_keys()[leaf.key] is int:  # randint: integer keys (not nullable ones); high exclusive
        specs += [{"distribution": "randint", "low": low, "high": high + 1} for low, high in pairs
                  if None not in (low, high)]
    assert len(specs) >= 2
    for spec in specs:
        path.write_text(yaml.safe_dump({"space": {leaf.key: spec}}))
        with pytest.raises(ConfigError) as caught:
            load_space(path, TrainConfig())
        message = str(caught.value)
        assert message.startswith(f"{path}: space key '{leaf.key}': value ")
        assert f"is refused: '{leaf.key}' must be " in message and "\n" not in message


def test_num_samples_from_the_command_line_is_checked():
    with pytest.raises(ConfigError, match="^s.yaml: 'num_samples' must be an integer >= 1, got 0$"):
        SearchSpace({}, 0, source="s.yaml")


def tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.mark.ray
def test_train_refuses_a_name_that_leaves_the_run_dir(tmp_path):
    """`frnet train --name ../../x`, as a user types it: exit 2, one line naming the override and
    the rule, before Ray starts; nothing written inside or outside --run-dir."""
    cwd = tmp_path / "a" / "b" / "c"
    cwd.mkdir(parents=True)
    before = tree(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(REPO_ROOT / "configs" / "train.yaml"),
         "--name", "../../x", "--run-dir", "run"], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert ("command line: 'run.name' must be a name of letters, digits, '.', '_' and '-' that starts with "
            "a letter or digit, has no '..' and is at most 128 characters, got '../../x'") in result.stderr
    assert "Traceback" not in result.stderr
    assert tree(tmp_path) == before


def test_train_and_tune_refuse_bad_settings_in_process(tmp_path, monkeypatch, ray_local, caplog):
    """The same through each stage's main: a run name in the config file, a sweep name from
    --name and from the sweep file, --epochs 0 for either; exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    train_yaml, tune_yaml = REPO_ROOT / "configs" / "train.yaml", REPO_ROOT / "configs" / "tune.yaml"
    space = str(REPO_ROOT / "tune_spaces" / "small.yaml")
    bad_train = tmp_path / "train.yaml"
    bad_train.write_text(yaml.safe_dump({"run": {"name": "x/../../y"}}))
    bad_sweep = tmp_path / "tune.yaml"
    bad_sweep.write_text(yaml.safe_dump({"name": "/tmp/elsewhere"}))
    for stage, argv in ((train, ["--config", str(bad_train)]),
                        (train, ["--config", str(train_yaml), "--epochs", "0"]),
                        (tune, ["--config", str(tune_yaml), "--space", space, "--name", "../../x"]),
                        (tune, ["--config", str(bad_sweep), "--space", space]),
                        (tune, ["--config", str(tune_yaml), "--space", space, "--epochs", "0"])):
        assert stage.main([*argv, "--run-dir", "run"]) == 2
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    rule = ("must be a name of letters, digits, '.', '_' and '-' that starts with a letter or digit, has no "
            "'..' and is at most {} characters, got {!r}")
    assert errors == [f"{bad_train}: 'run.name' " + rule.format(128, "x/../../y"),
                      "command line: 'epochs' must be >= 1, got 0",
                      "command line: 'name' " + rule.format(100, "../../x"),
                      f"{bad_sweep}: 'name' " + rule.format(100, "/tmp/elsewhere"),
                      "command line: 'epochs' must be >= 1, got 0"]
    assert tree(tmp_path) == ["train.yaml", "tune.yaml"]
