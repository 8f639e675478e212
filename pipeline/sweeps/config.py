"""Sweep configuration: ``configs/tune.yaml`` (resources, the base training config) and a
search space file ``tune_spaces/NAME.yaml`` (distributions, scheduler, searcher).

Search-space keys are the dotted keys of :class:`pipeline.training.config.TrainConfig`
(``loss.lambda1``, ``optim.lr``, ...); every bound and value is checked by building a
``TrainConfig`` with it, so a space cannot name a key or a value that training would refuse:
the same types, ranges (NaN and inf never) and name rules as a training config file. A
distribution the chosen searcher cannot sample is refused with the file too.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pipeline.runtime.config import (
    ConfigError,
    Name,
    Range,
    from_dict,
    load_config,
    read_yaml_mapping,
    with_overrides,
)
from pipeline.training.config import (
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    RESOURCE_AMOUNT,
    SEED_RANGE,
    TrainConfig,
    check_extra_resources,
)

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
# Keys a sweep sets itself (trial names, resources, the store) or that would change the data.
NOT_SEARCHABLE = ("run.", "mlflow.", "scaling.", "data.shards", "epochs")
# A trial's training run is named "<sweep>-<trial id>" (Tune's ids: 11 characters), and that name
# must pass run.name's rule (128 characters).
SWEEP_NAME = Name(max_length=100)
# Optuna stores a categorical's choices as they are: only these types (optuna.distributions).
OPTUNA_CHOICE_TYPES = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class TrialResources:
    """What one trial (one Ray Train run) asks for."""

    num_workers: Annotated[int, AT_LEAST_1] = 2
    cpus_per_worker: Annotated[float, POSITIVE] = 0.4  # leave CPUs to Ray Data (see configs/train.yaml)
    # > 0 trains on GPU; a fraction lets trials share one GPU.
    gpus_per_worker: Annotated[float, Range(ge=0)] = 0.0
    # Custom node resources per worker (scaling.resources_per_worker): with one unit per node and
    # one worker per trial, one trial per node.
    resources_per_worker: dict[str, Annotated[float, RESOURCE_AMOUNT]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_extra_resources(self.resources_per_worker)


@dataclass(frozen=True)
class SweepConfig:
    # The Tune experiment (its folder, its best model file); `--resume` continues the one of this name.
    name: Annotated[str, SWEEP_NAME] = "frnet-sweep"
    train_config: str = "train.yaml"  # the base training config, relative to this file
    epochs: Annotated[int, AT_LEAST_1] = 30  # per trial; ASHA's max_t
    trial: TrialResources = field(default_factory=TrialResources)
    # An upper bound on the trials running at once; null: as many as the cluster's resources hold.
    max_concurrent_trials: Annotated[int, AT_LEAST_1] | None = None
    # CPUs no trial's workers may take: Ray Data's read tasks need a whole free CPU each, and a
    # cluster whose CPUs all go to workers stalls its reads.
    reserved_cpus: Annotated[float, NON_NEGATIVE] = 1.0
    storage_path: str = ""  # empty: RUN_DIR/ray; shared storage (s3://, NFS) on a cluster
    register: bool = True  # evaluate the best trial on AFLW2000-3D and register it


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``uniform``/``loguniform``/``randint`` take ``low`` < ``high``
    (``randint``'s high is exclusive); ``choice`` (sampled) and ``grid`` (every value, in
    order) take ``values``."""

    distribution: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()


@dataclass(frozen=True)
class SchedulerSpec:
    name: Literal["asha", "fifo"] = "asha"
    grace_period: Annotated[int, AT_LEAST_1] = 1  # epochs before a trial can be stopped
    # Keep the best 1/reduction_factor at each rung.
    reduction_factor: Annotated[float, Range(gt=1)] = 3.0


@dataclass(frozen=True)
class SearcherSpec:
    # random: Tune's random search (grid dimensions run in order); optuna: Optuna's TPE, a model of
    # which values gave low NMEs, through Tune's OptunaSearch.
    name: Literal["random", "optuna"] = "random"
    seed: Annotated[int, SEED_RANGE] = 0
    # optuna: trials sampled at random before TPE models the results (Optuna's default: 10).
    startup_trials: Annotated[int, AT_LEAST_1] = 10


@dataclass(frozen=True)
class SpaceSettings:
    """A space file's keys besides ``space``."""

    num_samples: Annotated[int, AT_LEAST_1] = 8
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    searcher: SearcherSpec = field(default_factory=SearcherSpec)


@dataclass(frozen=True)
class SearchSpace:
    dimensions: dict[str, Dimension]
    num_samples: int = 8
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    searcher: SearcherSpec = field(default_factory=SearcherSpec)
    source: str = ""

    def __post_init__(self) -> None:  # built here from a file, or with `frnet tune --num-samples`
        if type(self.num_samples) is not int or AT_LEAST_1.refusal(self.num_samples):
            raise ConfigError(f"{self.source}: 'num_samples' must be an integer {AT_LEAST_1.describe()}, "
                              f"got {self.num_samples!r}")


def load_sweep_config(path: Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    return load_config(path, SweepConfig, overrides)


def base_train_config(sweep_path: Path, sweep: SweepConfig, overrides: dict[str, Any]) -> TrainConfig:
    """The training config every trial starts from (``train_config`` is relative to the sweep file)."""
    return load_config(Path(sweep_path).parent / sweep.train_config, TrainConfig, overrides)


def load_space(path: Path, base: TrainConfig) -> SearchSpace:
    """Read and check a search space file against the training config it will modify."""
    source = str(path)
    data = read_yaml_mapping(Path(path))
    known = ["space", *(item.name for item in dataclasses.fields(SpaceSettings))]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    raw_space = data.pop("space", None)
    if not isinstance(raw_space, dict) or not raw_space:
        raise ConfigError(f"{source}: 'space' must map at least one training key to a distribution")
    dimensions = {key: _dimension(key, spec, base, source) for key, spec in raw_space.items()}
    settings = from_dict(SpaceSettings, data, source)
    if settings.searcher.name == "optuna":
        for key, dimension in dimensions.items():
            _check_optuna(dimension, f"{source}: space key '{key}'")
    return SearchSpace(dimensions, settings.num_samples, settings.scheduler, settings.searcher, source)


def leaf_keys(cls: type = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every dotted leaf key of a config dataclass and its type hint."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            keys.update(leaf_keys(hint, f"{prefix}{item.name}."))
        else:
            keys[f"{prefix}{item.name}"] = hint
    return keys


def _dimension(key: str, spec: Any, base: TrainConfig, source: str) -> Dimension:
    keys = leaf_keys()
    where = f"{source}: space key '{key}'"
    if key not in keys:
        raise ConfigError(f"{where} is not a training config key (e.g. loss.lambda1, optim.lr)")
    if any(key == banned or (banned.endswith(".") and key.startswith(banned)) for banned in NOT_SEARCHABLE):
        raise ConfigError(f"{where} cannot be searched (the sweep sets run, mlflow, scaling, data.shards "
                          "and epochs itself)")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping like {{distribution: loguniform, low: 0.1, high: 10}}")
    allowed = {"distribution", "low", "high", "values"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field '{unknown[0]}' (known: {', '.join(sorted(allowed))})")
    distribution = spec.get("distribution")
    if distribution not in DISTRIBUTIONS:
        known = ", ".join(DISTRIBUTIONS)
        raise ConfigError(f"{where}: unknown distribution {distribution!r} (known: {known})")
    if distribution in ("choice", "grid"):
        values = spec.get("values")
        if not isinstance(values, list) or not values or {"low", "high"} & set(spec):
            raise ConfigError(f"{where}: '{distribution}' takes a non-empty list 'values' (no low/high)")
        checked = tuple(_checked_value(key, v, base, where) for v in values)
        return Dimension(distribution, values=checked)
    if "values" in spec or "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: '{distribution}' takes 'low' and 'high' (no values)")
    low, high = spec["low"], spec["high"]
    for name, bound in (("low", low), ("high", high)):
        if not _finite_number(bound):
            raise ConfigError(f"{where}: '{name}' must be a finite number, got {bound!r}")
    if low >= high:
        raise ConfigError(f"{where}: low must be below high, got low={low}, high={high}")
    if distribution == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
    if distribution == "randint":
        if keys[key] is not int or not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: randint is for integer keys with integer bounds")
        low, high = int(low), int(high)
        _checked_value(key, low, base, where)
        _checked_value(key, high - 1, base, where)
    else:
        if keys[key] is not float:
            raise ConfigError(f"{where}: {distribution} is for number keys; use choice or grid")
        _checked_value(key, float(low), base, where)
        _checked_value(key, float(high), base, where)
    return Dimension(distribution, low=low, high=high)


def _check_optuna(dimension: Dimension, where: str) -> None:
    """Optuna's TPE samples every key from its own distributions (float, log float, int,
    categorical): a grid (every value, in order) is not one, nor a choice of lists or mappings."""
    if dimension.distribution == "grid":
        raise ConfigError(f"{where}: searcher optuna cannot run a grid (it samples every key): use "
                          "distribution choice, or searcher random")
    odd = [v for v in dimension.values if not isinstance(v, OPTUNA_CHOICE_TYPES)]
    if odd:
        raise ConfigError(f"{where}: searcher optuna takes choice values that are numbers, strings, "
                          f"booleans or null, got {odd[0]!r}")


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _checked_value(key: str, value: Any, base: TrainConfig, where: str) -> Any:
    """``value`` if a training config takes it at ``key`` (its type, range or name rule, and the
    checks across keys), else a ConfigError naming the space file, the key and the rule."""
    try:
        with_overrides(base, {key: value}, source=where)
    except ConfigError as err:
        reason = str(err).removeprefix(f"{where}: ")
        raise ConfigError(f"{where}: value {value!r} is refused: {reason}") from err
    return value


@dataclass(frozen=True)
class SweepPlan:
    """A new sweep's settings, checked against each other before Ray starts: the sweep config,
    the base training config every trial starts from (its shard folder found), the space."""

    sweep: SweepConfig
    base: TrainConfig
    space: SearchSpace


def plan_sweep(config_path: Path, space_path: Path, overrides: dict[str, Any], shards: str | None,
               num_samples: int | None) -> SweepPlan:
    """Read the sweep config (with ``overrides``), its base training config (``shards``: the
    ``--shards`` flag, if given) and the space, and check them against each other: the shard
    folder exists, every searched key is a training key, the scheduler's grace period fits the
    epochs a trial trains. A ConfigError names the file and key."""
    from pipeline.runtime.paths import shards_location

    sweep = load_sweep_config(config_path, overrides)
    base = base_train_config(config_path, sweep, {"data.shards": shards} if shards else {})
    train_config = Path(config_path).parent / sweep.train_config
    # Trials run in working directories of their own, perhaps on other nodes: an absolute path.
    located = shards_location(base.data.shards, bool(shards), train_config)
    base = with_overrides(base, {"data.shards": located}, "base config")
    space = load_space(space_path, base)
    if num_samples is not None:
        space = dataclasses.replace(space, num_samples=num_samples)
    if space.scheduler.grace_period > sweep.epochs:
        raise ConfigError(
            f"{space_path}: scheduler.grace_period {space.scheduler.grace_period} exceeds the {sweep.epochs} "
            f"epochs per trial of {config_path} (lower it, or use a space made for short trials such as "
            "tune_spaces/small.yaml)")
    return SweepPlan(sweep, base, space)
