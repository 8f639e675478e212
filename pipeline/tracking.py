"""MLflow for the stages: the tracking store, runs, model logging and the registry. Every MLflow
call of the project goes through this module.

The embedded default store is ``sqlite:///<absolute run dir>/mlflow.db`` (Ray Train moves each
worker's working directory, so the path is absolute); never the deprecated ``./mlruns`` store.
Runs are addressed two ways: the driver's active run (``mlflow.start_run``), and a
:class:`TrackingTarget` (store and run id) that workers and trials log to from anywhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param
from mlflow.models import infer_signature
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from models.frame import CROP_SIZE

LOG = logging.getLogger("frnet.tracking")
CHAMPION = "champion"
# The figure a model is ranked by, stored as a version tag (lower is better).
RANKING_TAG = "aflw2000.nme_mean_of_bins"
# MLflow takes at most this many params in one batch.
PARAMS_PER_BATCH = 100


@dataclass(frozen=True)
class TrackingTarget:
    """One MLflow run in one store: where a worker or a trial logs."""

    tracking_uri: str
    run_id: str


def open_store(configured_uri: str, run_dir: Path, experiment: str) -> str:
    """Point this process at the store (:func:`tracking_uri`) and select ``experiment``;
    returns the experiment id."""
    mlflow.set_tracking_uri(tracking_uri(configured_uri, run_dir))
    return use_experiment(experiment, run_dir)


def use_store(uri: str) -> None:
    """Point this process at the store ``uri``."""
    mlflow.set_tracking_uri(uri)


def current_store() -> str:
    """The tracking URI this process logs to."""
    return mlflow.get_tracking_uri()


@contextmanager
def active_run(name: str | None = None, run_id: str | None = None) -> Iterator[TrackingTarget]:
    """Start (``name``) or continue (``run_id``) the driver's run; yields where it is."""
    with mlflow.start_run(run_name=name, run_id=run_id) as run:
        yield TrackingTarget(mlflow.get_tracking_uri(), run.info.run_id)


def tracking_uri(configured: str, run_dir: Path) -> str:
    """The configured URI, or the sqlite store in the run directory."""
    if configured:
        return configured
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir / 'mlflow.db'}"


def use_experiment(name: str, run_dir: Path) -> str:
    """Select (creating if needed) an experiment. With a local store its artifacts live in
    RUN_DIR/mlartifacts (MLflow would otherwise put them under ./mlruns of whatever directory the
    process runs in); with a tracking server, where the server keeps them."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        if mlflow.get_tracking_uri().startswith(("http://", "https://")):
            # A tracking server stores the artifacts where its --artifacts-destination says,
            # reachable from every node; a local path would exist on this machine only.
            location = None
        else:
            location = (Path(run_dir).resolve() / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: ``{"loss.lambda1": "1.0", ...}``."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = str(list(value) if isinstance(value, tuple) else value)
    return out


def log_network(network: torch.nn.Module, bundle_path: Path, name: str = "model") -> str:
    """Log the network (pickled module, signature, a batch-2 input example) with the model file
    beside it; returns the logged model's URI."""
    example = np.zeros((2, 3, CROP_SIZE, CROP_SIZE), dtype=np.float32)
    with torch.no_grad():
        output = network.eval()(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        network, name=name, signature=infer_signature(example, output), input_example=example,
        serialization_format="pickle", extra_files=[str(bundle_path)],
    )
    return info.model_uri


def register(name: str, model_uri: str, run_id: str, figures: dict[str, float]) -> tuple[str, bool]:
    """Register a model version with its evaluation figures as tags; move ``champion`` to it
    only if its NME beats the current champion's. Returns (version, promoted)."""
    client = mlflow.MlflowClient()
    version = str(mlflow.register_model(model_uri, name).version)
    for key, value in figures.items():  # full precision: the ranking tag is compared exactly
        client.set_model_version_tag(name, version, key, repr(float(value)))
    client.set_model_version_tag(name, version, "run_id", run_id)
    score = figures[RANKING_TAG]
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        best = float(current.tags.get(RANKING_TAG, "inf"))
    except mlflow.exceptions.MlflowException:
        current, best = None, float("inf")
    promoted = score < best
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
        LOG.info("%s version %s is the new champion (NME %.3f%%, was %s)", name, version, 100 * score,
                 "none" if current is None else f"{100 * best:.3f}%")
    else:
        LOG.info("%s version %s registered; the champion (version %s, NME %.3f%%) stays", name, version,
                 current.version, 100 * best)
    return version, promoted


def bundle_from_model_uri(model_uri: str, tracking: str | None = None) -> Any:
    """The model file logged beside a network (``models:/NAME@ALIAS``, ``runs:/...``, ...)."""
    from models.checkpoint import load_bundle

    if tracking:
        mlflow.set_tracking_uri(tracking)
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except mlflow.exceptions.MlflowException as err:
        store = mlflow.get_tracking_uri()
        raise ValueError(f"{model_uri}: cannot fetch from {store} ({err.message})") from err
    files = sorted((folder / "extra_files").glob("*.pt"))
    if len(files) != 1:
        raise ValueError(f"{model_uri}: expected one model file under extra_files/, found {len(files)}")
    bundle, _ = load_bundle(files[0])
    return bundle


def log_run_config(config: dict[str, Any], config_yaml: str, manifest: dict[str, Any],
                   tags: dict[str, str], prefix: str = "") -> None:
    """The active run's params (the flattened config), config files, the shards' manifest and tags."""
    log_params(flatten(config, prefix))
    mlflow.log_dict(config, "config.json")
    mlflow.log_text(config_yaml, "config.yaml")
    mlflow.log_dict(manifest, "manifest.json")
    mlflow.set_tags(tags)


def log_params(params: dict[str, Any]) -> None:
    """Params of the active run, in batches MLflow accepts."""
    items = list(params.items())
    for start in range(0, len(items), PARAMS_PER_BATCH):
        mlflow.log_params(dict(items[start:start + PARAMS_PER_BATCH]))


def log_metrics(metrics: dict[str, float]) -> None:
    """Metrics of the active run."""
    mlflow.log_metrics(metrics)


def log_dict(data: dict[str, Any], artifact_file: str) -> None:
    """A JSON artifact of the active run."""
    mlflow.log_dict(data, artifact_file)


def log_artifact(path: Path, folder: str) -> None:
    """A file into the active run's artifacts under ``folder``."""
    mlflow.log_artifact(str(path), folder)


def set_tags(tags: dict[str, str]) -> None:
    """Tags of the active run."""
    mlflow.set_tags(tags)


def log_epoch_metrics(target: TrackingTarget, metrics: dict[str, float]) -> None:
    """One epoch's metrics into ``target``, at step ``metrics["epoch"]``."""
    stamp = int(time.time() * 1000)
    step = int(metrics["epoch"])
    entries = [Metric(key, float(value), stamp, step) for key, value in metrics.items() if key != "epoch"]
    mlflow.MlflowClient(target.tracking_uri).log_batch(target.run_id, metrics=entries)


def metric_history(target: TrackingTarget, key: str) -> list[float]:
    """The values of metric ``key`` of ``target``, in step order."""
    history = mlflow.MlflowClient(target.tracking_uri).get_metric_history(target.run_id, key)
    return [metric.value for metric in sorted(history, key=lambda metric: metric.step)]


def tag_run(target: TrackingTarget, key: str, value: str) -> None:
    mlflow.MlflowClient(target.tracking_uri).set_tag(target.run_id, key, value)


def end_run(target: TrackingTarget, status: str) -> None:
    """End ``target`` as FINISHED, KILLED or FAILED."""
    mlflow.MlflowClient(target.tracking_uri).set_terminated(target.run_id, status)


def nested_run(store: str, experiment_id: str, parent_run_id: str, name: str, tags: dict[str, str],
               params: dict[str, str]) -> TrackingTarget:
    """A run under ``parent_run_id`` (a sweep's trial); found again by its ``trial_id`` tag,
    and then set running again, when one exists already."""
    client = mlflow.MlflowClient(store)
    existing = find_nested_run(store, experiment_id, parent_run_id, tags["trial_id"])
    if existing:
        client.update_run(existing, status="RUNNING")
        return TrackingTarget(store, existing)
    run = client.create_run(experiment_id, run_name=name, tags={MLFLOW_PARENT_RUN_ID: parent_run_id, **tags})
    entries = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(entries), PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=entries[start:start + PARAMS_PER_BATCH])
    return TrackingTarget(store, run.info.run_id)


def find_nested_run(store: str, experiment_id: str, parent_run_id: str, trial_id: str) -> str:
    """The id of the run under ``parent_run_id`` tagged ``trial_id``, or "" when there is none."""
    runs = mlflow.MlflowClient(store).search_runs(
        [experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' and tags.trial_id = '{trial_id}'")
    return runs[0].info.run_id if runs else ""


def close_run(target: TrackingTarget, tags: dict[str, str], metrics: dict[str, float], status: str) -> None:
    """Tag, score and end ``target``."""
    client = mlflow.MlflowClient(target.tracking_uri)
    for key, value in tags.items():
        client.set_tag(target.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(target.run_id, key, value)
    client.set_terminated(target.run_id, status)
