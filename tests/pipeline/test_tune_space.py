"""Search-space files: the shipped ones load, and every kind of mistake names its key; what a
searcher cannot sample is refused when the file is read; how many trials run at once follows
from the cluster's resources."""

from pathlib import Path

import optuna
import pytest
from ray.tune.search.optuna import OptunaSearch

from pipeline.runtime.config import ConfigError, from_dict, with_overrides
from pipeline.sweeps.config import SweepConfig, base_train_config, load_space, load_sweep_config
from pipeline.sweeps.search import plan_concurrency, search_domain
from pipeline.training.config import TrainConfig

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
    assert space.searcher.name == {"default": "optuna", "small": "random"}[name]


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


def test_an_optuna_space_reads_every_sampled_distribution(tmp_path):
    space = load_space(write_space(tmp_path, """
searcher: {name: optuna, seed: 5, startup_trials: 3}
space:
  loss.lambda1: {distribution: loguniform, low: 0.1, high: 10}
  loss.omega: {distribution: uniform, low: 2, high: 20}
  data.batch_size: {distribution: randint, low: 16, high: 65}
  optim.name: {distribution: choice, values: [sgd, adamw]}
"""), TrainConfig())
    assert (space.searcher.name, space.searcher.seed, space.searcher.startup_trials) == ("optuna", 5, 3)
    # Each becomes Optuna's own distribution (randint's high is exclusive, Optuna's inclusive).
    converted = OptunaSearch.convert_search_space(
        {"search": {key: search_domain(d) for key, d in space.dimensions.items()}})
    assert converted == {
        "search/loss.lambda1": optuna.distributions.FloatDistribution(0.1, 10, log=True),
        "search/loss.omega": optuna.distributions.FloatDistribution(2, 20),
        "search/data.batch_size": optuna.distributions.IntDistribution(16, 64),
        "search/optim.name": optuna.distributions.CategoricalDistribution(["sgd", "adamw"])}


@pytest.mark.parametrize(("entry", "message"), [
    ("optim.lr: {distribution: grid, values: [0.01, 0.02]}",
     "space key 'optim.lr': searcher optuna cannot run a grid"),
    ("optim.milestones: {distribution: choice, values: [[10, 20], [20, 30]]}",
     "space key 'optim.milestones': searcher optuna takes choice values that are numbers, strings, "
     "booleans or null, got [10, 20]"),
])
def test_what_optuna_cannot_sample_is_refused_naming_file_and_key(tmp_path, entry, message):
    path = write_space(tmp_path, f"searcher: {{name: optuna}}\nspace:\n  {entry}\n")
    with pytest.raises(ConfigError) as err:
        load_space(path, TrainConfig())
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    # The same entry is fine for the random searcher.
    load_space(write_space(tmp_path, f"searcher: {{name: random}}\nspace:\n  {entry}\n"), TrainConfig())


def sweep_config(**trial) -> SweepConfig:
    limit = trial.pop("max_concurrent_trials", None)
    return from_dict(SweepConfig, {"trial": trial, "max_concurrent_trials": limit})


@pytest.mark.parametrize(("sweep", "nodes", "trials", "why"), [
    # 2 CPUs, one CPU kept for Ray Data: two 0.4-CPU trials, one 2 x 0.4-CPU trial.
    (sweep_config(num_workers=1, cpus_per_worker=0.4), [{"CPU": 2.0}], 2, "holds 2 (bound: its CPUs)"),
    (sweep_config(num_workers=2, cpus_per_worker=0.4), [{"CPU": 2.0}], 1, "holds 1 (bound: its CPUs)"),
    # Fractional GPUs pack four trials on each of four GPU nodes; the head has no GPU.
    (sweep_config(num_workers=1, cpus_per_worker=0.75, gpus_per_worker=0.25),
     [{"CPU": 8.0}] + [{"CPU": 4.0, "GPU": 1.0}] * 4, 16, "holds 16 (bound: whole workers per node)"),
    # max_concurrent_trials caps what the resources allow; it does not set it.
    (sweep_config(num_workers=1, cpus_per_worker=0.75, gpus_per_worker=0.25, max_concurrent_trials=6),
     [{"CPU": 8.0}] + [{"CPU": 4.0, "GPU": 1.0}] * 4, 6, "capped at 6 by max_concurrent_trials"),
    # A worker cannot span nodes: two half-GPU nodes hold no 1-GPU worker.
    (sweep_config(num_workers=1, cpus_per_worker=1.0, gpus_per_worker=1.0, max_concurrent_trials=3),
     [{"CPU": 8.0, "GPU": 0.5}] * 2, 3, "holds none now"),
])
def test_trials_at_once_follow_from_the_resources(sweep, nodes, trials, why):
    plan = plan_concurrency(sweep, nodes, total_trials=24)
    assert plan.trials == trials and why in plan.reason
    assert plan.reason.startswith(f"{trials} trial{'s' if trials > 1 else ''} at once: a trial asks ")


def test_trials_at_once_never_exceed_the_sweeps_trials():
    plan = plan_concurrency(sweep_config(num_workers=1, cpus_per_worker=0.1), [{"CPU": 64.0}], total_trials=4)
    assert plan.trials == 4 and plan.reason.endswith("the sweep has 4 trial(s)")
