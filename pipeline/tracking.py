"""MLflow for the stages: the tracking store, runs, model logging and the registry.

The embedded default store is ``sqlite:///<absolute run dir>/mlflow.db`` (Ray Train moves each
worker's working directory, so the path is absolute); never the deprecated ``./mlruns`` store.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature

LOG = logging.getLogger("frnet.tracking")
CHAMPION = "champion"
# The figure a model is ranked by, stored as a version tag (lower is better).
RANKING_TAG = "aflw2000.nme_mean_of_bins"


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
    example = np.zeros((2, 3, 120, 120), dtype=np.float32)
    with torch.no_grad():
        output = network.eval()(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        network, name=name, signature=infer_signature(example, output), input_example=example,
        serialization_format="pickle", extra_files=[str(bundle_path)],
    )
    return info.model_uri


def register(client: mlflow.MlflowClient, name: str, model_uri: str, run_id: str,
             figures: dict[str, float]) -> tuple[str, bool]:
    """Register a model version with its evaluation figures as tags; move ``champion`` to it
    only if its NME beats the current champion's. Returns (version, promoted)."""
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
