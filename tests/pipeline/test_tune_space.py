"""Search-space files: the shipped ones load, and every kind of mistake names its key."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, with_overrides
from pipeline.train_config import TrainConfig
from pipeline.tune_config import base_train_config, load_space, load_sweep_config

REPO = Path(__file__).resolve().parents[2]


def write_space(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["default", "small"])
def test_shipped_spaces_load_against_the_shipped_configs(name):
    sweep = load_sweep_config(REPO / "configs" / "tune.yaml")
    base = base_train_config(REPO / "configs" / "tune.yaml", sweep, {})
    space = load_space(REPO / "tune_spaces" / f"{name}.yaml", base)
    assert {"loss.lambda1", "loss.lambda2", "loss.omega"} <= set(space.dimensions)
    assert space.scheduler.name == "asha" and space.scheduler.grace_period <= sweep.epochs


def test_a_full_space_is_read_as_written(tmp_path):
    space = load_space(write_space(tmp_path, """
num_samples: 6
searcher: {name: random, seed: 3}
scheduler: {name: asha, grace_period: 2, reduction_factor: 4}
space:
  loss.lambda1: {distribution: loguniform, low: 0.1, high: 10}
  optim.lr: {distribution: uniform, low: 0.001, high: 0.01}
  data.batch_size: {distribution: randint, low: 16, high: 65}
  optim.name: {distribution: choice, values: [sgd, adamw]}
  optim.milestones: {distribution: grid, values: [[10, 20], [20, 30]]}
"""), TrainConfig())
    assert space.num_samples == 6 and space.searcher.seed == 3
    assert space.scheduler.grace_period == 2 and space.scheduler.reduction_factor == 4
    assert space.dimensions["loss.lambda1"].low == 0.1 and space.dimensions["loss.lambda1"].high == 10
    assert space.dimensions["data.batch_size"].low == 16
    assert space.dimensions["optim.name"].values == ("sgd", "adamw")
    assert space.dimensions["optim.milestones"].values == ([10, 20], [20, 30])


@pytest.mark.parametrize(("entry", "message"), [
    ("loss.lamda1: {distribution: uniform, low: 0, high: 1}", "'loss.lamda1' is not a training config key"),
    ("loss.lambda1: {distribution: uniform, low: 2, high: 1}", "'loss.lambda1': low must be below high"),
    ("loss.omega: {distribution: normal, low: 1, high: 2}", "'loss.omega': unknown distribution 'normal'"),
    ("loss.omega: {distribution: loguniform, low: 0, high: 2}", "'loss.omega': loguniform needs low > 0"),
    ("loss.omega: {distribution: uniform, lo: 1, high: 2}", "'loss.omega': unknown field 'lo'"),
    ("loss.omega: {distribution: uniform, low: 1}", "'loss.omega': 'uniform' takes 'low' and 'high'"),
    ("loss.lambda2: {distribution: uniform, low: -1, high: 1}", "'loss.lambda2': value -1.0 is refused"),
    ("optim.name: {distribution: choice, values: [sgd, adam]}", "'optim.name': value 'adam' is refused"),
    ("optim.name: {distribution: choice, values: []}", "'optim.name': 'choice' takes a non-empty list"),
    ("loss.omega: {distribution: randint, low: 1, high: 5}", "'loss.omega': randint is for integer keys"),
    ("data.batch_size: {distribution: uniform, low: 8, high: 64}", "uniform is for number"),
    ("run.name: {distribution: choice, values: [a, b]}", "'run.name' cannot be searched"),
    ("data.shards: {distribution: choice, values: [a, b]}", "'data.shards' cannot be searched"),
    ("loss.omega: 3.0", "'loss.omega' must be a mapping"),
])
def test_bad_space_entries_name_the_key(tmp_path, entry, message):
    path = write_space(tmp_path, f"space:\n  {entry}\n")
    with pytest.raises(ConfigError) as err:
        load_space(path, TrainConfig())
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(("text", "message"), [
    ("space: {}\n", "'space' must map at least one training key"),
    ("spaces: {loss.omega: {distribution: uniform, low: 1, high: 2}}\n", "unknown key 'spaces'"),
    ("num_samples: 0\nspace: {loss.omega: {distribution: uniform, low: 1, high: 2}}\n", "'num_samples'"),
    ("scheduler: {name: hyperband}\nspace: {loss.omega: {distribution: uniform, low: 1, high: 2}}\n",
     "'scheduler.name' must be one of"),
    ("scheduler: {reduction_factor: 1}\nspace: {loss.omega: {distribution: uniform, low: 1, high: 2}}\n",
     "'scheduler.reduction_factor' must be a finite number > 1, got 1.0"),
    ("searcher: {name: bayes}\nspace: {loss.omega: {distribution: uniform, low: 1, high: 2}}\n",
     "'searcher.name' must be one of"),
])
def test_bad_space_files_say_what_is_wrong(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_space(write_space(tmp_path, text), TrainConfig())


def test_overrides_keep_every_other_key():
    base = TrainConfig()
    changed = with_overrides(base, {"loss.lambda1": 2.5, "optim.milestones": [5, 9]}, "test")
    assert changed.loss.lambda1 == 2.5 and changed.optim.milestones == (5, 9)
    assert changed.loss.lambda2 == base.loss.lambda2 and changed.model == base.model
