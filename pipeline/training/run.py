"""A training run on the driver: MLflow run, Ray Train fit, best model file, evaluation gate.

Before anything starts, the shard files are checked against the manifest's counts (footers
only). A run name is used once; ``resume`` continues an unfinished run of that name with the same
config, in the same MLflow run (:mod:`pipeline.training.resume`); a run left RUNNING by a driver killed
hard is marked KILLED first. Ctrl-C ends the MLflow run as KILLED and raises
:class:`TrainingInterrupted` with the checkpoint the run can resume from; a run that Ray Train
gives up on (its retries spent, or an error it does not retry, such as its storage not answering
when it records a checkpoint) ends FAILED and raises :class:`TrainingFailed` with the same.
After training,
the best checkpoint (by validation NME) is written to RUN_DIR/models/NAME.pt and logged to
MLflow; with AFLW2000-3D shards beside the training shards it is evaluated and registered.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray.exceptions
import ray.train
import yaml
from ray.train.torch import TorchTrainer
from ray.train.v2.api.exceptions import RayTrainError

from models.checkpoint import load_bundle
from pipeline.data.shard_reader import check_shards, shard_read_failure
from pipeline.registration.gate import Registration, evaluate_and_register
from pipeline.runtime.cluster_storage import check_shared, training_folders
from pipeline.runtime.config import to_plain
from pipeline.runtime.console import causes, redact, sigint_seen
from pipeline.runtime.tracking import (
    TrackingTarget,
    active_run,
    close_stale_runs,
    current_store,
    learning_rate_params,
    log_epoch_metrics,
    log_metrics,
    log_params,
    log_run_config,
    log_served_model,
    metric_steps,
    open_store,
)
from pipeline.training.config import TrainConfig
from pipeline.training.resume import last_saved, run_folder, run_to_continue, saved_epoch_metrics
from pipeline.training.trainer import best_model_file, make_trainer
from preprocessing.manifest import Manifest, read_manifest

LOG = logging.getLogger("frnet.train")


@dataclass(frozen=True)
class TrainingResult:
    """What a training run leaves: its MLflow run, the best epoch's model file and figures, and
    its registration (None when the shards hold no AFLW2000-3D faces to score it on)."""

    run_id: str
    tracking_uri: str
    model_uri: str
    model_file: str
    best: dict[str, Any]
    synthetic_data: bool
    registration: Registration | None = None

    def to_json(self) -> dict[str, Any]:
        figures = {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "model_uri": self.model_uri,
                   "model_file": self.model_file, "best": self.best, "synthetic_data": self.synthetic_data}
        return figures | (self.registration.to_json() if self.registration is not None else {})


class TrainingInterrupted(Exception):
    """Ctrl-C stopped the run ``name`` (MLflow run ``run_id``, now KILLED); ``saved`` is its newest
    checkpoint (folder, epoch), or None when no epoch finished."""

    def __init__(self, name: str, run_id: str, saved: tuple[str, int] | None) -> None:
        super().__init__(f"run {name!r} interrupted")
        self.name, self.run_id, self.saved = name, run_id, saved


class TrainingFailed(Exception):
    """Ray Train gave up on the run ``name`` (MLflow run ``run_id``, now FAILED; its checkpoints
    in ``folder``) for ``reason`` (the first line of the error under Ray's); ``saved`` is the
    checkpoint it resumes from (folder, epoch), None when no epoch finished, or the error met
    looking it up (the storage may still be away)."""

    def __init__(self, name: str, run_id: str, saved: tuple[str, int] | None | OSError, reason: str,
                 folder: str) -> None:
        super().__init__(f"run {name!r} failed: {reason}")
        self.name, self.run_id, self.saved, self.reason, self.folder = name, run_id, saved, reason, folder


@dataclass(frozen=True)
class RunPlan:
    """What :func:`plan_run` found before any Ray work: the run's folder, its shards' manifest
    and the MLflow run it continues (None: a new run)."""

    run_dir: Path
    manifest: Manifest
    continued: str | None


def plan_run(config: TrainConfig, run_dir: Path, resume: bool = False) -> RunPlan:
    """The checks that need no Ray, so a refused run is told in seconds: the shard files against
    their manifest (a ShardError), the tracking store opened (runs left RUNNING by a driver killed
    hard marked KILLED), and the run name (a ConfigError: in use without ``resume``, or a run
    that cannot be resumed)."""
    run_dir = run_dir.resolve()
    manifest = read_manifest(config.data.shards)
    check_shards(config.data.shards, manifest)
    experiment_id = open_store(config.mlflow.tracking_uri, run_dir, config.mlflow.experiment)
    close_stale_runs(experiment_id)
    return RunPlan(run_dir, manifest, run_to_continue(config, run_dir, experiment_id, resume))


def train(config: TrainConfig, run_dir: Path, resume: bool = False,
          plan: RunPlan | None = None) -> TrainingResult:
    """Train, log to MLflow and write the best model file; returns what the run left. The
    checks of :func:`plan_run` come first (``plan``: made already, with the same arguments), then
    the folders every node must see (on a cluster); TrainingInterrupted reports Ctrl-C."""
    plan = plan_run(config, run_dir, resume) if plan is None else plan
    run_dir, manifest, continued = plan.run_dir, plan.manifest, plan.continued
    check_shared(training_folders("run.storage_path", config.run.storage_path, run_dir, config.data.shards))
    run_id = continued
    try:
        with active_run(name=None if continued else config.run.name, run_id=continued) as run:
            run_id = run.run_id
            if continued:
                log_unlogged_epoch(config, run_dir, run)
            return tracked_run(config, run_dir, manifest, run)
    except KeyboardInterrupt as err:
        raise TrainingInterrupted(config.run.name, run_id or "", last_saved(config, run_dir)) from err
    except RayTrainError as err:
        if shard_read_failure(err) is not None:  # the shards', told by the command as such
            raise
        try:
            saved: tuple[str, int] | None | OSError = last_saved(config, run_dir)
        except OSError as lookup:
            saved = lookup
        raise TrainingFailed(config.run.name, run_id or "", saved, failure_reason(err),
                             run_folder(config, run_dir)) from err


def failure_reason(err: BaseException) -> str:
    """The first line of the innermost error under Ray's wrappers (the storage's, the worker's),
    with any secret taken out: ``Type: message``."""
    wrappers = (RayTrainError, ray.exceptions.RayError)
    inner = [error for error in causes(err) if not isinstance(error, wrappers)]
    chosen = inner[-1] if inner else err
    lines = redact(str(chosen)).strip().splitlines()
    return f"{type(chosen).__name__}: {lines[0] if lines else ''}"


def log_unlogged_epoch(config: TrainConfig, run_dir: Path, run: TrackingTarget) -> None:
    """A run stopped between Ray Train registering an epoch's checkpoint and that epoch reaching
    MLflow (SIGTERM, a lost head) resumes after the epoch: its figures, kept in the checkpoint,
    are logged now, so the curve holds every epoch once."""
    metrics = saved_epoch_metrics(config, run_dir)
    if metrics is not None and int(metrics["epoch"]) not in metric_steps(run, "val_nme"):
        log_epoch_metrics(run, metrics)
        LOG.info("epoch %d's figures logged from its checkpoint (the run stopped before they reached "
                 "MLflow)", int(metrics["epoch"]))


def tracked_run(config: TrainConfig, run_dir: Path, manifest: Manifest,
                run: TrackingTarget) -> TrainingResult:
    """The run inside its MLflow run: training, the best model file, its evaluation."""
    synthetic = manifest.morphable_model.synthetic
    tags = {"synthetic_data": str(synthetic), "morphable_model": manifest.morphable_model.identity}
    log_run_config(asdict(config), yaml.safe_dump(to_plain(config), sort_keys=False), manifest.to_dict(),
                   tags)
    log_params(learning_rate_params(config))
    LOG.info("learning rate %.4g: optim.lr %.4g, %s scaling from a global batch of %d to %d",
             config.lr, config.optim.lr, config.optim.lr_scaling, config.optim.reference_batch,
             config.global_batch)
    result = fit(make_trainer(config, run_dir, manifest, run))
    model_path, metrics = best_model_file(result, run_dir / "models" / f"{config.run.name}.pt")
    bundle, _ = load_bundle(model_path)
    model_uri = log_served_model(bundle)
    log_metrics({"best_val_nme": metrics["val_nme"], "best_epoch": metrics["epoch"]})
    registration = None
    if manifest.aflw2000 is not None:
        registration = evaluate_and_register(bundle, config.data.shards, manifest,
                                             config.mlflow.registered_model, model_uri, run.run_id)
    return TrainingResult(run.run_id, current_store(), model_uri, str(model_path), metrics, synthetic,
                          registration)


def fit(trainer: TorchTrainer) -> ray.train.Result:
    """``trainer.fit()``; a KeyboardInterrupt when Ctrl-C stopped it (Ray Train aborts the run on
    SIGINT itself, and ``fit`` then raises SystemExit)."""
    with sigint_seen() as interrupted:
        try:
            return trainer.fit()
        except BaseException as err:
            if interrupted():
                raise KeyboardInterrupt from err
            raise
