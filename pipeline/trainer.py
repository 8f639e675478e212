"""Building Ray Train's TorchTrainer for a config, and getting its best model file back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from models.face_models import load_face_model
from pipeline.shard_data import shard_datasets
from pipeline.tracking import TrackingTarget
from pipeline.train_config import TrainConfig
from pipeline.worker import CHECKPOINT_FILE, WorkerInputs, loop_config, train_loop_per_worker
from preprocessing.manifest import Manifest


def worker_inputs(manifest: Manifest, tracking: TrackingTarget | None) -> WorkerInputs:
    """The workers' inputs from the shards' manifest; the morphable model that labelled the
    shards must still be the one its source names."""
    labels = manifest.morphable_model
    model = load_face_model(labels.source)
    if model.identity != labels.identity:
        raise ValueError(f"the shards were labelled with {labels.identity}, "
                         f"but {labels.source!r} is now {model.identity}")
    return WorkerInputs(manifest.whitening, labels.source, model.identity, tracking)


def make_trainer(config: TrainConfig, run_dir: Path, manifest: Manifest, tracking: TrackingTarget | None,
                 callbacks: list[ray.train.UserCallback] | None = None) -> TorchTrainer:
    """A TorchTrainer for ``config``; ``tracking`` names the MLflow run that gets the epochs."""
    storage = config.run.storage_path or str((run_dir / "ray").resolve())
    resources = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(config, worker_inputs(manifest, tracking)),
        scaling_config=ray.train.ScalingConfig(num_workers=config.scaling.num_workers,
                                               use_gpu=config.scaling.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=config.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=config.run.name, storage_path=storage, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.run.keep_checkpoints, checkpoint_score_attribute="val_nme",
                checkpoint_score_order="min"),
        ),
        datasets=shard_datasets(config.data.shards, manifest, config.data.cache_decoded),
    )


def best_model_file(result: ray.train.Result, destination: Path) -> tuple[Path, dict[str, Any]]:
    """Copy the best checkpoint's model file (lowest val_nme) to ``destination``."""
    checkpoint, metrics = min(result.best_checkpoints, key=lambda pair: pair[1]["val_nme"])
    return copy_model_file(checkpoint, destination), metrics


def copy_model_file(checkpoint: ray.train.Checkpoint, destination: Path) -> Path:
    """The model file of a checkpoint (local or on shared storage) copied to ``destination``."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as folder:
        destination.write_bytes((Path(folder) / CHECKPOINT_FILE).read_bytes())
    return destination
