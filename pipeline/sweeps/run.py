"""Ray Tune sweeps over the loss weights, Wing's omega/epsilon and any other training key; each
trial is a full Ray Train run, tracked in MLflow as one parent run with a nested run per trial.

A searcher (random, or Optuna's TPE) picks each trial's values, as many trials run at once as
the cluster holds (:mod:`pipeline.sweeps.search`), and ASHA stops weak trials on their validation
NME; afterwards the sweep's table and plots go to the parent run, and the best trial's best
checkpoint is evaluated on the AFLW2000-3D shards, registered, and made ``champion`` only if it
beats the current one. The sweep's own files live in its storage (:mod:`pipeline.sweeps.state`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
import yaml
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY as CHECKPOINT_PATH
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import FIFOScheduler

from models.checkpoint import load_bundle
from pipeline.data.shard_reader import check_shards
from pipeline.registration.gate import Registration, evaluate_and_register
from pipeline.runtime.cluster_storage import check_shared, storage_location, training_folders
from pipeline.runtime.config import ConfigError, from_dict, to_plain, with_overrides
from pipeline.runtime.console import is_verbose
from pipeline.runtime.tracking import (
    TrackingTarget,
    active_run,
    close_run,
    end_run,
    find_nested_run,
    flatten,
    learning_rate_params,
    log_artifact,
    log_dict,
    log_metrics,
    log_params,
    log_served_model,
    metric_history,
    nested_run,
    open_store,
    set_tags,
    use_store,
)
from pipeline.sweeps.config import (
    Dimension,
    SearchSpace,
    SweepConfig,
    load_space,
    load_sweep_config,
    plan_sweep,
)
from pipeline.sweeps.report import (
    COMPLETED,
    FAILED,
    STOPPED,
    TrialRow,
    plot_against_keys,
    plot_curves,
    ranked,
)
from pipeline.sweeps.report import write_table as write_results_table
from pipeline.sweeps.search import (
    TRIAL_DRIVER_CPU,
    cluster_nodes,
    plan_concurrency,
    search_algorithm,
    search_domain,
)
from pipeline.sweeps.state import (
    ASHA_RUNGS,
    ResumableASHA,
    read_text,
    store_sweep_files,
    sweep_file_location,
)
from pipeline.training.config import TrainConfig
from pipeline.training.trainer import copy_model_file, make_trainer
from preprocessing.datasets import resolve
from preprocessing.manifest import read_manifest

LOG = logging.getLogger("frnet.tune")
METRIC = "val_nme"
BEST_CONFIG = "best_train.yaml"  # in the sweep folder
SWEEP_STATE = "sweep.json"  # the SweepContext, in the sweep folder and the sweep's storage
# A resource Ray gives the head node only.
HEAD_NODE_RESOURCE = "node:__internal_head__"


@dataclass(frozen=True)
class SweepRequest:
    """What the command line asks of a sweep."""

    config: Path  # the sweep's YAML
    space: Path | None  # the search space; None with resume (the sweep's own copy is read)
    run_dir: Path
    shards: str | None = None
    storage: str | None = None
    name: str | None = None
    epochs: int | None = None
    num_samples: int | None = None
    resume: bool = False


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its sampled values (plain data: it travels to the trials)."""

    name: str
    run_dir: str
    storage: str
    base: dict[str, Any]  # the base TrainConfig, shards made absolute
    sweep: dict[str, Any]  # the SweepConfig
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trials_at_once: int = 1  # planned when the sweep started; Tune keeps it with its searcher
    concurrency: str = ""  # why that many


# -- the trial ----------------------------------------------------------------------------------

def trial_config(context: SweepContext, searched: dict[str, Any], trial_id: str) -> TrainConfig:
    """The base config with the trial's sampled values and the sweep's fixed keys."""
    sweep = from_dict(SweepConfig, context.sweep, source="sweep")
    gpus = sweep.trial.gpus_per_worker
    fixed = {"epochs": sweep.epochs, "run.name": f"{context.name}-{trial_id}",
             "run.storage_path": context.storage, "scaling.num_workers": sweep.trial.num_workers,
             "scaling.cpus_per_worker": sweep.trial.cpus_per_worker, "scaling.use_gpu": gpus > 0,
             "scaling.gpus_per_worker": gpus if gpus > 0 else 1.0,
             "scaling.resources_per_worker": dict(sweep.trial.resources_per_worker)}
    base = from_dict(TrainConfig, context.base, source="base config")
    return with_overrides(base, {**searched, **fixed}, source=f"trial {trial_id}")


def run_trial(config: dict[str, Any], context: SweepContext) -> None:
    """One Tune trial: a Ray Train run of the sampled config (Ray 2.60's Train-inside-Tune driver).
    Its Train run is named after the trial, so a resumed trial continues from its last checkpoint."""
    trial_id = ray.tune.get_context().get_trial_id()
    train_config = trial_config(context, config["search"], trial_id)
    manifest = read_manifest(train_config.data.shards)
    target = trial_run(context, trial_id, train_config, config["search"])
    trainer = make_trainer(train_config, Path(context.run_dir), manifest, target,
                           callbacks=[TuneReportCallback()])
    trained = len(metric_history(target, METRIC))  # epochs a run before an interruption logged
    result = trainer.fit()
    if trained >= train_config.epochs:
        report_finished_run(result, trained)
    end_run(target, "FINISHED")


def report_finished_run(result: ray.train.Result, epoch: int) -> None:
    """A resumed trial whose Train run had already trained every epoch: the run reports nothing
    now, and Tune may not have taken its last report before the interruption (it refuses a
    trial that ends without its metric), so the last epoch is reported again."""
    metrics = {key: value for key, value in (result.metrics or {}).items() if key in (METRIC, "epoch")}
    if METRIC not in metrics:
        raise RuntimeError(f"{result.path}: the finished Train run has no {METRIC} to report")
    metrics.setdefault("epoch", epoch)
    if result.checkpoint is not None:
        metrics[CHECKPOINT_PATH] = result.checkpoint.path
    ray.tune.report(metrics)


def trial_run(context: SweepContext, trial_id: str, config: TrainConfig, searched: dict[str, Any],
              ) -> TrackingTarget:
    """The trial's MLflow run under the sweep's parent run (found again when a trial resumes)."""
    tags = {"trial_id": trial_id, "sweep": context.name, "searched": ", ".join(sorted(searched))}
    return nested_run(context.tracking_uri, context.experiment_id, context.parent_run_id, trial_id, tags,
                      {**flatten(asdict(config)), **learning_rate_params(config)})


def find_trial_run(context: SweepContext, trial_id: str) -> str:
    return find_nested_run(context.tracking_uri, context.experiment_id, context.parent_run_id, trial_id)


# -- the sweep ----------------------------------------------------------------------------------

def make_tuner(context: SweepContext, space: SearchSpace, sweep: SweepConfig, resume: bool) -> ray.tune.Tuner:
    """A new sweep's Tuner, or the interrupted one's with its searcher and trials (Tune restores
    the search algorithm it saved, its concurrency included)."""
    # Trials run on the head node, as the sweep's driver does: their Train controllers log the
    # epochs to the store there.
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, context=context),
                                        {"CPU": TRIAL_DRIVER_CPU, HEAD_NODE_RESOURCE: TRIAL_DRIVER_CPU})
    experiment = f"{context.storage.rstrip('/')}/{context.name}"
    if resume:
        if not ray.tune.Tuner.can_restore(experiment):
            raise FileNotFoundError(f"{experiment}: no Tune state to resume")
        return ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    if space.scheduler.name == "asha":
        scheduler = ResumableASHA(sweep_file_location(context.storage, context.name, ASHA_RUNGS),
                                  time_attr="epoch", max_t=sweep.epochs,
                                  grace_period=space.scheduler.grace_period,
                                  reduction_factor=space.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return ray.tune.Tuner(
        trainable,
        param_space={"search": {key: search_domain(d) for key, d in space.dimensions.items()}},
        tune_config=ray.tune.TuneConfig(
            metric=METRIC, mode="min", scheduler=scheduler, num_samples=space.num_samples,
            search_alg=search_algorithm(space, context.trials_at_once),
            trial_name_creator=lambda trial: trial.trial_id,
            trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=ray.tune.RunConfig(name=context.name, storage_path=context.storage,
                                      verbose=1 if is_verbose() else 0, callbacks=[TrialLines()]),
    )


class TrialLines(ray.tune.Callback):
    """A console line as each trial ends: its best validation NME and the best trial so far, as
    the sweep ranks them (lowest NME any epoch reached), in place of Tune's status tables."""

    def __init__(self) -> None:
        self.best: dict[str, tuple[float, int]] = {}  # trial id -> (lowest val_nme, its epoch)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if METRIC in result:
            reached = (float(result[METRIC]), int(result.get("epoch", 0)))
            self.best[trial.trial_id] = min(self.best.get(trial.trial_id, reached), reached)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "ended")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "FAILED")

    def _ended(self, trial: Any, how: str) -> None:
        if trial.trial_id not in self.best:
            LOG.info("trial %s %s without a validation NME", trial.trial_id, how)
            return
        nme, epoch = self.best[trial.trial_id]
        leader = min(self.best, key=lambda key: (self.best[key], key))
        LOG.info("trial %s %s: best validation NME %.3f%% (epoch %d); best trial so far %s, %.3f%%",
                 trial.trial_id, how, 100 * nme, epoch, leader, 100 * self.best[leader][0])


def collect_rows(grid: ray.tune.ResultGrid, context: SweepContext, epochs: int) -> list[TrialRow]:
    rows = []
    for result in grid:
        trial_id = Path(result.path).name
        frame = result.metrics_dataframe
        curve, checkpoint = [], ""
        if frame is not None and METRIC in frame:
            frame = frame.dropna(subset=[METRIC]).drop_duplicates("epoch", keep="last")
            curve = [(int(e), float(v)) for e, v in zip(frame["epoch"], frame[METRIC], strict=True)]
            if curve and CHECKPOINT_PATH in frame:
                checkpoint = str(frame.loc[frame[METRIC].idxmin(), CHECKPOINT_PATH])
        if result.error is not None:
            state = FAILED
        else:
            state = COMPLETED if curve and curve[-1][0] >= epochs else STOPPED
        rows.append(TrialRow(trial_id, state, dict(result.config.get("search", {})), curve, checkpoint,
                             find_trial_run(context, trial_id),
                             "" if result.error is None else str(result.error).splitlines()[0][:300]))
    return rows


def close_trial_runs(rows: list[TrialRow], context: SweepContext) -> None:
    """Each nested run ends as its trial did (ASHA stops a trial by ending its process)."""
    for row in rows:
        if not row.mlflow_run_id:
            continue
        status = {COMPLETED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED"}[row.state]
        close_run(TrackingTarget(context.tracking_uri, row.mlflow_run_id), {"trial_state": row.state},
                  {"best_val_nme": row.best[1]} if row.best else {}, status)


def report_sweep(rows: list[TrialRow], space: SearchSpace, sweep_dir: Path) -> None:
    """The results table and plots, written to the sweep folder and the parent run."""
    keys = list(space.dimensions)
    write_results_table(rows, keys, sweep_dir / "results.csv")
    log_keys = {key: space.dimensions[key].distribution == "loguniform" for key in keys}
    plot_against_keys(rows, log_keys, sweep_dir / "nme_vs_searched_keys.png")
    plot_curves(rows, sweep_dir / "validation_curves.png")
    names = ("results.csv", "nme_vs_searched_keys.png", "validation_curves.png", "space.yaml", "tune.yaml")
    for name in names:
        log_artifact(sweep_dir / name, "sweep")


def write_best_config(best: TrialRow, base: TrainConfig, path: Path) -> Path:
    """The base training config with the best trial's searched values: what to train longer
    (``frnet train --config PATH``)."""
    config = with_overrides(base, best.searched, source=f"trial {best.trial_id}")
    header = (f"# The sweep's base training config with trial {best.trial_id}'s searched values "
              f"(validation NME {100 * best.best[1]:.3f}% at epoch {best.best[0]}).\n"
              f"# Train it: frnet train --config {path}\n")
    path.write_text(header + yaml.safe_dump(to_plain(config), sort_keys=False))
    return path


@dataclass(frozen=True)
class BestModel:
    """The best trial's model: its file, its logged MLflow model, its registration if any."""

    model_file: str
    model_uri: str
    registration: Registration | None = None


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep: its trials best first, the best trial's config file and model."""

    sweep: str
    parent_run_id: str
    tracking_uri: str
    trials: list[TrialRow]
    best_trial: str
    best_config: str
    best_model: BestModel
    synthetic_data: bool
    sweep_dir: str

    def to_json(self) -> dict[str, Any]:
        figures = {"sweep": self.sweep, "parent_run_id": self.parent_run_id,
                   "tracking_uri": self.tracking_uri,
                   "trials": [asdict(row) | {"best": row.best} for row in self.trials],
                   "best_trial": self.best_trial, "best_config": self.best_config,
                   "model_file": self.best_model.model_file, "model_uri": self.best_model.model_uri,
                   "synthetic_data": self.synthetic_data, "sweep_dir": self.sweep_dir}
        registration = self.best_model.registration
        return figures | (registration.to_json() if registration is not None else {})


def register_best(best: TrialRow, context: SweepContext, base: TrainConfig) -> BestModel:
    """The best trial's best checkpoint: a model file, logged to the parent run, evaluated on
    AFLW2000-3D and registered (``champion`` only if it beats the current one)."""
    filesystem, _ = resolve(context.storage)
    checkpoint = ray.train.Checkpoint(best.checkpoint_path, filesystem=filesystem)
    model_path = copy_model_file(checkpoint, Path(context.run_dir) / "models" / f"{context.name}-best.pt")
    bundle, _ = load_bundle(model_path)
    model_uri = log_served_model(bundle)
    registration = None
    manifest = read_manifest(base.data.shards)
    sweep = from_dict(SweepConfig, context.sweep, source="sweep")
    if not sweep.register:
        LOG.info("register: false in the sweep config; the best model is not registered")
    elif manifest.aflw2000 is None:
        LOG.warning("%s has no AFLW2000-3D shards (preprocess with --aflw2000): the best model is not "
                    "evaluated or registered", base.data.shards)
    else:
        registration = evaluate_and_register(bundle, base.data.shards, manifest, base.mlflow.registered_model,
                                             model_uri, context.parent_run_id)
    return BestModel(str(model_path), model_uri, registration)


def prepare(args: SweepRequest) -> tuple[SweepContext, SearchSpace, SweepConfig, Path]:
    """A new sweep (parent MLflow run, its folder, its files in its storage) or, with --resume,
    the stored one."""
    run_dir = args.run_dir.resolve()
    flags = (("name", args.name), ("epochs", args.epochs), ("storage_path", args.storage))
    overrides = {k: v for k, v in flags if v is not None}
    sweep = load_sweep_config(args.config, overrides)
    sweep_dir = run_dir / "tune" / sweep.name
    if args.resume:
        return stored_sweep(storage_location(sweep.storage_path, run_dir), sweep.name, run_dir)
    state_path = sweep_dir / SWEEP_STATE
    storage = storage_location(sweep.storage_path, run_dir)
    if state_path.exists() or read_text(sweep_file_location(storage, sweep.name, SWEEP_STATE)) is not None:
        where = sweep_dir if state_path.exists() else f"{storage}/{sweep.name}"
        raise ConfigError(f"a sweep named {sweep.name!r} exists in {where}: --resume continues it, "
                          "--name starts another")
    plan = plan_sweep(args.config, args.space, overrides, args.shards, args.num_samples)
    base, space = plan.base, plan.space
    manifest = read_manifest(base.data.shards)
    check_shards(base.data.shards, manifest)  # missing, truncated or miscounted: refused here
    setting = f"{args.config}: storage_path"
    check_shared(training_folders(setting, sweep.storage_path, run_dir, base.data.shards))
    experiment_id = open_store(base.mlflow.tracking_uri, run_dir, base.mlflow.experiment)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    space_text = Path(args.space).read_text()
    if args.num_samples is not None:  # the stored copy is what a resumed sweep reads
        space_text = yaml.safe_dump({**yaml.safe_load(space_text), "num_samples": args.num_samples},
                                    sort_keys=False)
    (sweep_dir / "space.yaml").write_text(space_text)
    (sweep_dir / "tune.yaml").write_text(yaml.safe_dump(to_plain(sweep), sort_keys=False))
    with active_run(name=sweep.name) as parent:
        set_tags({"sweep": sweep.name, "synthetic_data": str(manifest.morphable_model.synthetic)})
        log_params({**flatten(asdict(base), "base."), **flatten(asdict(sweep), "sweep."),
                    **{f"space.{k}": _describe(d) for k, d in space.dimensions.items()},
                    "space.num_samples": space.num_samples})
        log_dict(manifest.to_dict(), "manifest.json")
    at_once = plan_concurrency(sweep, cluster_nodes(), expected_trials(space))
    context = SweepContext(
        name=sweep.name, run_dir=str(run_dir), storage=storage, base=to_plain(base), sweep=to_plain(sweep),
        tracking_uri=parent.tracking_uri, experiment_id=experiment_id, parent_run_id=parent.run_id,
        trials_at_once=at_once.trials, concurrency=at_once.reason)
    state_path.write_text(json.dumps(asdict(context), indent=2) + "\n")
    store_sweep_files(storage, sweep.name, [state_path, sweep_dir / "space.yaml", sweep_dir / "tune.yaml"])
    return context, space, sweep, sweep_dir


def stored_sweep(storage: str, name: str, run_dir: Path,
                 ) -> tuple[SweepContext, SearchSpace, SweepConfig, Path]:
    """The sweep ``name`` as its storage keeps it (else, for a sweep started before the storage
    held its files, as this run folder does), with this head's run folder: its files are
    copied there, and the best model will be."""
    sweep_dir = run_dir / "tune" / name
    local = sweep_dir / SWEEP_STATE
    stored = read_text(sweep_file_location(storage, name, SWEEP_STATE))
    if stored is None and not local.exists():
        raise ConfigError(f"{sweep_file_location(storage, name, SWEEP_STATE)}: no sweep named {name!r} to "
                          f"resume in {storage} (nor in {run_dir}); the storage path (storage_path, "
                          "--storage) must be the one it started with")
    context = SweepContext(**json.loads(local.read_text() if stored is None else stored))
    context = replace(context, run_dir=str(run_dir))
    check_store_reachable(context)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for file_name in (SWEEP_STATE, "space.yaml", "tune.yaml"):
        text = read_text(sweep_file_location(storage, name, file_name))
        if text is not None:
            (sweep_dir / file_name).write_text(text)
    local.write_text(json.dumps(asdict(context), indent=2) + "\n")
    base = from_dict(TrainConfig, context.base, source=str(local))
    sweep = from_dict(SweepConfig, context.sweep, source=str(local))
    return context, load_space(sweep_dir / "space.yaml", base), sweep, sweep_dir


def check_store_reachable(context: SweepContext) -> None:
    """A sweep's MLflow store must be reachable from the head that resumes it: a sqlite file
    stays on the head that started the sweep."""
    prefix = "sqlite:///"
    if context.tracking_uri.startswith(prefix) and not Path(context.tracking_uri[len(prefix):]).exists():
        raise ConfigError(f"sweep {context.name}: its MLflow store {context.tracking_uri} is not on this "
                          "machine; resume it on the head that has it, or give sweeps an MLflow server "
                          "(mlflow.tracking_uri: http://...) that every head reaches")


def _describe(dimension: Dimension) -> str:
    if dimension.distribution in ("choice", "grid"):
        return f"{dimension.distribution}{list(dimension.values)}"
    return f"{dimension.distribution}({dimension.low}, {dimension.high})"


def run_sweep(args: SweepRequest) -> SweepResult:
    """Run (or resume) a sweep on Ray Tune; returns what it found."""
    context, space, sweep, sweep_dir = prepare(args)
    use_store(context.tracking_uri)
    LOG.info("sweep %s: %d samples over %s, searcher %s, %s; MLflow parent run %s", context.name,
             space.num_samples, ", ".join(space.dimensions), space.searcher.name, space.scheduler.name,
             context.parent_run_id)
    LOG.info("sweep %s: %s%s", context.name, context.concurrency,
             " (planned when it started)" if args.resume else "")
    grid = make_tuner(context, space, sweep, args.resume).fit()
    if ended_trials(grid) < expected_trials(space):
        storage = f" --storage {args.storage}" if args.storage else ""
        raise SweepInterrupted(
            f"sweep {context.name} stopped before all {expected_trials(space)} trials finished; "
            f"continue it with: frnet tune --config {args.config} --run-dir {args.run_dir} "
            f"--name {context.name}{storage} --resume")
    rows = collect_rows(grid, context, sweep.epochs)
    close_trial_runs(rows, context)
    base = from_dict(TrainConfig, context.base, source="base config")
    with active_run(run_id=context.parent_run_id):
        report_sweep(rows, space, sweep_dir)
        usable = [row for row in ranked(rows) if row.best and row.checkpoint_path]
        if not usable:
            raise RuntimeError(f"sweep {context.name}: no trial reported a validation NME "
                               f"(see {sweep_dir / 'results.csv'})")
        best = usable[0]
        log_metrics({"best_val_nme": best.best[1], "trials_completed": _count(rows, COMPLETED),
                     "trials_stopped_early": _count(rows, STOPPED), "trials_failed": _count(rows, FAILED)})
        set_tags({"best_trial": best.trial_id})
        best_config = write_best_config(best, base, sweep_dir / BEST_CONFIG)
        log_artifact(sweep_dir / BEST_CONFIG, "sweep")
        store_sweep_files(context.storage, context.name, [sweep_dir / "results.csv", sweep_dir / BEST_CONFIG])
        best_model = register_best(best, context, base)
    synthetic = read_manifest(base.data.shards).morphable_model.synthetic
    return SweepResult(context.name, context.parent_run_id, context.tracking_uri, ranked(rows), best.trial_id,
                       str(best_config), best_model, synthetic, str(sweep_dir))


class SweepInterrupted(RuntimeError):
    """The sweep stopped (Ctrl-C, SIGUSR1) before every trial finished; Tune saved its state."""


def ended_trials(grid: ray.tune.ResultGrid) -> int:
    """Trials that ran to their end or failed. Interrupted, Tune counts the trials it had created
    but not started as terminated, without a result: they start on --resume."""
    never_started = sum(result.error is None and not result.metrics for result in grid)
    return grid.num_terminated + grid.num_errors - never_started


def expected_trials(space: SearchSpace) -> int:
    """``num_samples`` times the size of the grid (Tune repeats the grid per sample)."""
    grid = math.prod(len(d.values) for d in space.dimensions.values() if d.distribution == "grid")
    return space.num_samples * grid


def _count(rows: list[TrialRow], state: str) -> int:
    return sum(row.state == state for row in rows)


