"""A training run on the driver: MLflow run, Ray Train fit, best model file, evaluation gate.

A run name is used once; ``resume`` continues an unfinished run of that name with the same
config, in the same MLflow run (:mod:`pipeline.resume`). After training,
the best checkpoint (by validation NME) is written to RUN_DIR/models/NAME.pt and logged to
MLflow; with AFLW2000-3D shards beside the training shards it is evaluated and registered.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from models.checkpoint import load_bundle
from pipeline.cluster_storage import check_shared, training_folders
from pipeline.config import to_plain
from pipeline.registration import evaluate_and_register
from pipeline.resume import run_to_continue
from pipeline.tracking import (
    active_run,
    current_store,
    learning_rate_params,
    log_metrics,
    log_params,
    log_run_config,
    log_served_model,
    open_store,
)
from pipeline.train_config import TrainConfig
from pipeline.trainer import best_model_file, make_trainer
from preprocessing.manifest import read_manifest

LOG = logging.getLogger("frnet.train")


def train(config: TrainConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train, log to MLflow and write the best model file; returns the run's figures. A
    ConfigError refuses a run name in use (without ``resume``) or a run that cannot be resumed."""
    run_dir = run_dir.resolve()
    manifest = read_manifest(config.data.shards)
    check_shared(training_folders("run.storage_path", config.run.storage_path, run_dir, config.data.shards))
    experiment_id = open_store(config.mlflow.tracking_uri, run_dir, config.mlflow.experiment)
    continued = run_to_continue(config, run_dir, experiment_id, resume)
    synthetic = manifest.morphable_model.synthetic
    tags = {"synthetic_data": str(synthetic), "morphable_model": manifest.morphable_model.identity}
    with active_run(name=None if continued else config.run.name, run_id=continued) as run:
        log_run_config(asdict(config), yaml.safe_dump(to_plain(config), sort_keys=False), manifest.to_dict(),
                       tags)
        log_params(learning_rate_params(config))
        LOG.info("learning rate %.4g: optim.lr %.4g, %s scaling from a global batch of %d to %d",
                 config.lr, config.optim.lr, config.optim.lr_scaling, config.optim.reference_batch,
                 config.global_batch)
        result = make_trainer(config, run_dir, manifest, run).fit()
        model_path, metrics = best_model_file(result, run_dir / "models" / f"{config.run.name}.pt")
        bundle, _ = load_bundle(model_path)
        model_uri = log_served_model(bundle)
        log_metrics({"best_val_nme": metrics["val_nme"], "best_epoch": metrics["epoch"]})
        figures = {"run_id": run.run_id, "tracking_uri": current_store(), "model_uri": model_uri,
                   "model_file": str(model_path), "best": metrics, "synthetic_data": synthetic}
        if manifest.aflw2000 is not None:
            figures.update(evaluate_and_register(bundle, config.data.shards, manifest,
                                                 config.mlflow.registered_model, model_uri, run.run_id))
    return figures
