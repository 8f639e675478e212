"""Train Mobile-FRNet with Ray Train (DDP) on the Parquet shards, tracked in MLflow.

    frnet train --config configs/train.yaml [--shards DIR] [--epochs N] [--run-dir DIR]
    python pipeline/train.py --config configs/train.yaml
    ray submit cluster.yaml pipeline/train.py -- --config configs/train.yaml

Runs on the Ray cluster it finds (RAY_ADDRESS, or a running local one), else starts a local one.
Re-running with the same ``run.name`` resumes from the latest checkpoint. After training, the
best checkpoint (by validation NME) is written to RUN_DIR/models/NAME.pt and logged to MLflow.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer

from models.checkpoint import ModelBundle, load_bundle
from models.face_models import load_face_model
from pipeline.common import init_ray, setup_logging, write_json
from pipeline.tracking import flatten, log_network, register, tracking_uri, use_experiment
from pipeline.train_config import TrainConfig, to_plain
from pipeline.training import (
    CHECKPOINT_FILE,
    evaluate_on_shards,
    read_manifest,
    shard_datasets,
    train_loop_per_worker,
)
from preprocessing.config import ConfigError, from_dict, load_config

LOG = logging.getLogger("frnet.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="frnet train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="YAML with TrainConfig's keys (configs/train.yaml)")
    parser.add_argument("--shards", help="override data.shards: a `frnet preprocess` output")
    parser.add_argument("--epochs", type=int, help="override epochs")
    parser.add_argument("--name", help="override run.name (the same name resumes)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/default"),
                        help="where the Ray run, the MLflow store and the model file go")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray started here (default: all)")
    parser.add_argument("--json", type=Path, help="write the run's figures here")
    return parser.parse_args(argv)


def load_train_config(args: argparse.Namespace) -> TrainConfig:
    overrides = {key: value for key, value in (("data.shards", args.shards), ("epochs", args.epochs),
                                                ("run.name", args.name)) if value is not None}
    if args.config:
        return load_config(args.config, TrainConfig, overrides)
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        target = nested
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    return from_dict(TrainConfig, nested, source="command line")


def make_trainer(config: TrainConfig, run_dir: Path, manifest: dict[str, Any],
                 mlflow_run: dict[str, str] | None,
                 callbacks: list[ray.train.UserCallback] | None = None) -> TorchTrainer:
    """A TorchTrainer for ``config``; ``mlflow_run`` (tracking URI and run id) gets the epochs."""
    storage = config.run.storage_path or str((run_dir / "ray").resolve())
    model = load_face_model(manifest["morphable_model"]["source"])
    if model.identity != manifest["morphable_model"]["identity"]:
        raise ValueError(f"the shards were labelled with {manifest['morphable_model']['identity']}, "
                         f"but {manifest['morphable_model']['source']!r} is now {model.identity}")
    loop_config = {
        "train": asdict(config),
        "whitening": {"mean": manifest["whitening"]["mean"], "std": manifest["whitening"]["std"]},
        "morphable_source": manifest["morphable_model"]["source"],
        "morphable_identity": model.identity,
        "mlflow": mlflow_run,
    }
    resources = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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


def train(config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Train, log to MLflow and write the best model file; returns the run's figures."""
    run_dir = run_dir.resolve()
    manifest = read_manifest(config.data.shards)
    mlflow.set_tracking_uri(tracking_uri(config.mlflow.tracking_uri, run_dir))
    use_experiment(config.mlflow.experiment, run_dir)
    with mlflow.start_run(run_name=config.run.name) as run:
        mlflow.log_params(flatten(asdict(config)))
        mlflow.log_dict(asdict(config), "config.json")
        mlflow.log_text(yaml.safe_dump(to_plain(config), sort_keys=False), "config.yaml")
        mlflow.log_dict(manifest, "manifest.json")
        mlflow.set_tags({"synthetic_data": str(manifest["morphable_model"]["source"] == "synthetic"),
                         "morphable_model": manifest["morphable_model"]["identity"]})
        mlflow_run = {"tracking_uri": mlflow.get_tracking_uri(), "run_id": run.info.run_id}
        trainer = make_trainer(config, run_dir, manifest, mlflow_run)
        result = trainer.fit()
        model_path, metrics = best_model_file(result, run_dir / "models" / f"{config.run.name}.pt")
        bundle, _ = load_bundle(model_path)
        model_uri = log_network(bundle.build_network(), model_path)
        mlflow.log_metrics({"best_val_nme": metrics["val_nme"], "best_epoch": metrics["epoch"]})
        figures = {"run_id": run.info.run_id, "tracking_uri": mlflow.get_tracking_uri(),
                   "model_uri": model_uri, "model_file": str(model_path), "best": metrics,
                   "synthetic_data": manifest["morphable_model"]["source"] == "synthetic"}
        if "aflw2000" in manifest:
            figures.update(evaluate_and_register(bundle, config, manifest, model_uri, run.info.run_id))
    return figures


def evaluate_and_register(bundle: ModelBundle, config: TrainConfig, manifest: dict[str, Any],
                          model_uri: str, run_id: str) -> dict[str, Any]:
    """Evaluate on the AFLW2000-3D shards, log the figures, register the model with them as
    version tags and move the ``champion`` alias to it only if it beats the current one."""
    report = evaluate_on_shards(bundle.predictor(), config.data.shards, manifest)
    mlflow.log_dict(report, "evaluation/aflw2000.json")
    summary = {"aflw2000.nme_mean_of_bins": report["nme_mean_of_bins"],
               "aflw2000.nme_std_of_bins": report["nme_std_of_bins"],
               "aflw2000.nme_per_sample_mean": report["nme_per_sample_mean"]}
    mlflow.log_metrics(summary)
    LOG.info("AFLW2000-3D NME %.3f%% (mean of yaw bins; %s)", 100 * report["nme_mean_of_bins"],
             "synthetic faces" if manifest["morphable_model"]["source"] == "synthetic" else "real")
    version, promoted = register(mlflow.MlflowClient(), config.mlflow.registered_model, model_uri, run_id,
                                 summary)
    return {"aflw2000": report, "registered_model": config.mlflow.registered_model,
            "model_version": version, "champion": promoted}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        config = load_train_config(args)
    except ConfigError as err:
        LOG.error("%s", err)
        return 2
    if not ray.is_initialized():
        init_ray(args.num_cpus, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        figures = train(config, args.run_dir)
    except (FileNotFoundError, ValueError) as err:
        LOG.error("%s", err)
        return 1
    best = figures["best"]
    print(f"\nbest epoch {best['epoch']}: validation NME {100 * best['val_nme']:.3f}%"
          f"{' (synthetic data)' if figures['synthetic_data'] else ''}")
    print(f"model file: {figures['model_file']}\nMLflow run {figures['run_id']} in {figures['tracking_uri']}")
    if "aflw2000" in figures:
        report = figures["aflw2000"]
        cells = [f"{b['range']}: " + ("-" if b["mean"] is None else f"{100 * b['mean']:.2f}")
                 + f" ({b['count']})" for b in report["bins"]]
        print(f"AFLW2000-3D NME by |yaw| bin (%):  {'  '.join(cells)}  "
              f"mean {100 * report['nme_mean_of_bins']:.2f}")
        state = "now the champion" if figures["champion"] else "registered; the champion stays"
        print(f"model {figures['registered_model']} version {figures['model_version']}: {state}")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
