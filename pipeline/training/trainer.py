"""Building Ray Train's TorchTrainer for a config, logging its epochs, getting its best model
file back.

The epochs reach MLflow from :class:`EpochLogger`, a Train callback that runs in the Train
controller beside the driver, so a store on the driver's node (the default sqlite file) is
right wherever the workers run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from models.face_models import load_face_model
from pipeline.data.shard_reader import crops_per_source, shard_datasets
from pipeline.runtime.cluster_storage import storage_location
from pipeline.runtime.console import is_verbose
from pipeline.runtime.torch_backend import LoopbackTorchConfig
from pipeline.runtime.tracking import TrackingTarget, log_epoch_metrics, tag_run
from pipeline.training.config import DataConfig, TrainConfig
from pipeline.training.worker import (
    CHECKPOINT_FILE,
    NODE_ID_KEY,
    WorkerInputs,
    loop_config,
    train_loop_per_worker,
)
from preprocessing.manifest import Manifest

LOG = logging.getLogger("frnet.train")
NODE_IDS_TAG = "train.node_ids"


class EpochLogger(ray.train.UserCallback):
    """Each report's epoch metrics (rank 0's) into the MLflow run ``target``, and the node of
    every worker as the tag ``train.node_ids`` (sorted, comma-joined) whenever it changes."""

    def __init__(self, target: TrackingTarget) -> None:
        self.target = target
        self.node_ids: list[str] = []

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: ray.train.Checkpoint | None) -> None:
        node_ids = [str(worker_metrics.get(NODE_ID_KEY)) for worker_metrics in metrics]
        if node_ids != self.node_ids:
            self.node_ids = node_ids
            LOG.info("%d workers on %d nodes (node id by rank): %s", len(node_ids), len(set(node_ids)),
                     ", ".join(node_ids))
            tag_run(self.target, NODE_IDS_TAG, ",".join(sorted(node_ids)))
        log_epoch_metrics(self.target, epoch_figures(metrics[0]))


def epoch_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """A report's figures without the worker's node id."""
    return {key: value for key, value in metrics.items() if key != NODE_ID_KEY}


def worker_inputs(manifest: Manifest, data: DataConfig) -> WorkerInputs:
    """The workers' inputs from the shards' manifest; the morphable model that labelled the
    shards (it must still be the one its source names) is loaded here, once, and handed to the
    workers through the object store."""
    labels = manifest.morphable_model
    model = load_face_model(labels.source)
    if model.identity != labels.identity:
        raise ValueError(f"the shards were labelled with {labels.identity}, "
                         f"but {labels.source!r} is now {model.identity}")
    return WorkerInputs(manifest.whitening, ray.put(model), labels.source, model.identity,
                        data.shuffle_rows(crops_per_source(manifest)))


def make_trainer(config: TrainConfig, run_dir: Path, manifest: Manifest, tracking: TrackingTarget | None,
                 callbacks: list[ray.train.UserCallback] | None = None) -> TorchTrainer:
    """A TorchTrainer for ``config``; ``tracking`` names the MLflow run that gets the epochs."""
    storage = storage_location(config.run.storage_path, run_dir)
    # The epoch reaches MLflow before any other callback sees it: Tune's, reporting to a
    # scheduler, may end the trial on it.
    callbacks = [*([EpochLogger(tracking)] if tracking is not None else []), *(callbacks or [])]
    resources = {**config.scaling.resources_per_worker, "CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(config, worker_inputs(manifest, config.data)),
        torch_config=LoopbackTorchConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=config.scaling.num_workers,
                                               use_gpu=config.scaling.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=config.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=config.run.name, storage_path=storage, callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="INFO" if is_verbose() else "WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.run.keep_checkpoints, checkpoint_score_attribute="val_nme",
                checkpoint_score_order="min"),
        ),
        datasets=shard_datasets(config.data.shards, manifest, config.data, config.seed),
        dataset_config=ray.train.DataConfig(execution_options=ingest_options(config.data)),
    )


def ingest_options(data: DataConfig) -> ray.data.ExecutionOptions:
    """Ray Data's options for Ray Train's ingest of the shard datasets: the driver's, reading
    ahead into at most ``data.read_ahead_mib`` of object-store memory."""
    current = ray.data.DataContext.get_current().execution_options
    limits = current.resource_limits
    if data.read_ahead_mib is not None:
        limits = limits.copy(object_store_memory=data.read_ahead_mib * 2**20)
    return ray.data.ExecutionOptions(resource_limits=limits, preserve_order=current.preserve_order,
                                     verbose_progress=current.verbose_progress)


def best_model_file(result: ray.train.Result, destination: Path) -> tuple[Path, dict[str, Any]]:
    """Copy the best checkpoint's model file (lowest val_nme) to ``destination``."""
    checkpoint, metrics = min(result.best_checkpoints, key=lambda pair: pair[1]["val_nme"])
    return copy_model_file(checkpoint, destination), epoch_figures(metrics)


def copy_model_file(checkpoint: ray.train.Checkpoint, destination: Path) -> Path:
    """The model file of a checkpoint (local or on shared storage) copied to ``destination``."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as folder:
        destination.write_bytes((Path(folder) / CHECKPOINT_FILE).read_bytes())
    return destination
