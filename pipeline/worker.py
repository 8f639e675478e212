"""The Ray Train worker loop and the data it reads: Mobile-FRNet on the Parquet shards.

Only this module and the stage scripts import ``ray.train``; the pieces it puts together
(networks, losses, the morphable model, whitening) live in ``models``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from models.checkpoint import ModelBundle, bundle_from_dict, save_bundle
from models.face_models import load_face_model
from models.losses import FRNetLoss, dewhiten
from models.params import ParamStats
from models.predictor import INPUT_MEAN, INPUT_SCALE, FacePredictor
from models.registry import build_model
from pipeline.train_config import OptimConfig, TrainConfig
from preprocessing.config import from_dict
from preprocessing.datasets import resolve
from preprocessing.shards import decode_image

LOG = logging.getLogger("frnet.train")
CHECKPOINT_FILE = "model.pt"
CROP_SIZE = 120


# -- data -------------------------------------------------------------------------------------

def read_manifest(shards: str) -> dict[str, Any]:
    """The ``manifest.json`` of a ``frnet preprocess`` output (path or URI)."""
    filesystem, path = resolve(shards)
    info = filesystem.get_file_info(f"{path}/manifest.json")
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{shards}: no manifest.json (not a `frnet preprocess` output)")
    with filesystem.open_input_stream(info.path) as stream:
        return json.loads(stream.read())


def decode_batch(batch: dict[str, np.ndarray], image_format: str) -> dict[str, np.ndarray]:
    """Shard rows -> uint8 images (B, 120, 120, 3) and float32 labels / landmarks."""
    images = np.stack([decode_image(data, image_format, CROP_SIZE) for data in batch["image"]])
    return {
        "image": images,
        "label": np.asarray(np.stack(batch["label"]), dtype=np.float32),
        "landmarks": np.asarray(np.stack(batch["landmarks"]), dtype=np.float32),
    }


def shard_datasets(shards: str, manifest: dict[str, Any], cache_decoded: bool = False,
                   ) -> dict[str, ray.data.Dataset]:
    """Ray datasets of the train and val shards, decoded to uint8 crops in Ray Data tasks (once,
    into the object store, with ``cache_decoded``; otherwise again every epoch)."""
    filesystem, root = resolve(shards)
    image_format = manifest["image_format"]
    datasets = {}
    for split in ("train", "val"):
        paths = [f"{root}/{name}" for name in manifest["splits"][split]]
        if not paths:
            raise ValueError(f"{shards}: the {split} split is empty")
        dataset = ray.data.read_parquet(paths, filesystem=filesystem).select_columns(
            ["image", "label", "landmarks"])
        dataset = dataset.map_batches(decode_batch, fn_kwargs={"image_format": image_format},
                                      batch_format="numpy", batch_size=256)
        datasets[split] = dataset.materialize() if cache_decoded else dataset
    return datasets


def images_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 120, 120, 3) BGR -> float (B, 3, 120, 120), the predictor's normalisation."""
    return ((images.float() - INPUT_MEAN) / INPUT_SCALE).permute(0, 3, 1, 2)


# -- optimisation -----------------------------------------------------------------------------

def make_optimizer(network: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(network.parameters(), lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=config.weight_decay)
    return torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(epoch: int, config: OptimConfig, epochs: int) -> float:
    """Learning-rate multiplier of an epoch: warm-up, then steps (sgd) or cosine (adamw)."""
    if epoch < config.warmup_epochs:
        return config.warmup_factor
    if config.name == "sgd":
        return config.gamma ** sum(epoch >= m for m in config.milestones)
    span = max(1, epochs - config.warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - config.warmup_epochs) / span))


# -- metrics ----------------------------------------------------------------------------------

def landmark_nme(pred_landmarks: torch.Tensor, true_landmarks: torch.Tensor) -> torch.Tensor:
    """Per-sample 2D NME (B,) of crop landmarks (B, 3, 68), normalised by sqrt(w*h) of the truth."""
    extent = true_landmarks[:, :2].amax(dim=2) - true_landmarks[:, :2].amin(dim=2)  # (B, 2)
    norm = torch.sqrt(extent[:, 0] * extent[:, 1]).clamp_min(1e-6)
    error = torch.linalg.vector_norm(pred_landmarks[:, :2] - true_landmarks[:, :2], dim=1).mean(dim=1)
    return error / norm


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


# -- the worker loop --------------------------------------------------------------------------

def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function; ``loop_config`` holds the config dict and the run's data facts."""
    config = from_dict(TrainConfig, loop_config["train"], source="train_loop_config")
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    _record_nodes(_gather_node_ids(), rank, loop_config.get("mlflow"))
    if config.deterministic:
        ray.train.torch.enable_reproducibility(seed=config.seed)
    torch.manual_seed(config.seed + rank)
    # Intra-op threads to match the CPUs Ray gave this worker; more would oversubscribe the node.
    torch.set_num_threads(max(1, round(config.scaling.cpus_per_worker)))
    stats = ParamStats.from_dict(loop_config["whitening"])
    face_model = load_face_model(loop_config["morphable_source"])
    network = build_model(config.model.arch, config.model.width)
    use_gpu = device.type == "cuda"
    if use_gpu and config.channels_last:
        network = network.to(memory_format=torch.channels_last)
    network = ray.train.torch.prepare_model(network)
    optimizer = make_optimizer(network, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_factor(epoch, config.optim, config.epochs))
    start_epoch = _resume(network, optimizer, scheduler)
    loss_fn = FRNetLoss(config.loss.lambda1, config.loss.lambda2, stats, face_model,
                        omega=config.loss.omega, epsilon=config.loss.epsilon,
                        num_resampled=config.loss.num_resampled)
    mean = torch.tensor(stats.mean, dtype=torch.float32, device=device)
    std = torch.tensor(stats.std, dtype=torch.float32, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_gpu and config.bf16)
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        network.train()
        sums = np.zeros(4)  # loss, wpdc, wing, samples
        train_shard = ray.train.get_dataset_shard("train")
        for batch in train_shard.iter_torch_batches(
            batch_size=config.data.batch_size, local_shuffle_buffer_size=config.data.shuffle_buffer,
            local_shuffle_seed=config.seed * 1000 + epoch + rank, device=device,
        ):
            inputs = images_to_input(batch["image"])
            if use_gpu and config.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            target = (batch["label"] - mean) / std
            with autocast:
                prediction = network(inputs)
            parts = loss_fn(prediction.float(), target, generator)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            optimizer.step()
            n = len(target)
            sums += [parts.total.item() * n, parts.wpdc.item() * n, parts.wing.item() * n, n]
        train_seconds = time.perf_counter() - started
        sums = np.array(_all_reduce([*sums, train_seconds], device))
        val_sum, val_count = _validate(network, face_model, stats, config, device, autocast)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        samples = sums[3]
        metrics = {key: float(value) for key, value in {
            "epoch": epoch + 1,
            "train_loss": sums[0] / max(samples, 1), "train_wpdc": sums[1] / max(samples, 1),
            "train_wing": sums[2] / max(samples, 1), "val_nme": val_sum / max(val_count, 1),
            "lr": lr, "samples_per_second": samples / (sums[4] / context.get_world_size()),
        }.items()}
        metrics["epoch"] = int(metrics["epoch"])
        if not math.isfinite(metrics["val_nme"]):  # diverged: rank it last, never as NaN
            metrics["val_nme"] = math.inf
        _report(metrics, network, optimizer, scheduler, loop_config, config, stats, rank)


def _gather_node_ids() -> list[str]:
    """The Ray node id of every worker, in rank order (a collective: every worker calls it)."""
    node_id = ray.get_runtime_context().get_node_id()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [node_id]
    node_ids: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(node_ids, node_id)
    return node_ids


def _record_nodes(node_ids: list[str], rank: int, tracking: dict[str, str] | None) -> None:
    """Rank 0 logs where the workers run and tags the driver's MLflow run with it
    (``train.node_ids``: one id per worker, sorted, comma-joined)."""
    if rank != 0:
        return
    LOG.info("%d workers on %d nodes (node id by rank): %s", len(node_ids), len(set(node_ids)),
             ", ".join(node_ids))
    if tracking:
        import mlflow

        mlflow.MlflowClient(tracking["tracking_uri"]).set_tag(
            tracking["run_id"], "train.node_ids", ",".join(sorted(node_ids)))


def _validate(network, face_model, stats, config, device, autocast) -> tuple[float, float]:
    network.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=config.data.eval_batch_size, device=device,
        ):
            with autocast:
                prediction = network(images_to_input(batch["image"]))
            params = dewhiten(prediction.float().double(), stats)
            predicted = face_model.landmarks(params)  # (B, 3, 68), y up
            predicted = torch.stack([predicted[:, 0], CROP_SIZE + 1 - predicted[:, 1], predicted[:, 2]], 1)
            truth = batch["landmarks"].double().reshape(-1, 3, 68)
            nme = landmark_nme(predicted, truth)
            total += nme.sum().item()
            count += len(nme)
    return tuple(_all_reduce([total, count], device))


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if hasattr(network, "module") else network


def _report(metrics, network, optimizer, scheduler, loop_config, config, stats, rank) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint and logs the epoch."""
    if rank != 0:
        ray.train.report(metrics)
        return
    LOG.info("epoch %d/%d  loss %.4f (wpdc %.4f, wing %.4f)  val NME %.3f%%  lr %.2e  %.0f samples/s",
             metrics["epoch"], config.epochs, metrics["train_loss"], metrics["train_wpdc"],
             metrics["train_wing"], 100 * metrics["val_nme"], metrics["lr"], metrics["samples_per_second"])
    tracking = loop_config.get("mlflow")
    if tracking:
        _log_epoch(tracking["tracking_uri"], tracking["run_id"], metrics)
    state = {k: v.detach().cpu() for k, v in _unwrap(network).state_dict().items()}
    bundle = ModelBundle(
        arch=config.model.arch, width=config.model.width, state_dict=state, param_stats=stats,
        morphable_source=loop_config["morphable_source"],
        morphable_identity=loop_config["morphable_identity"], config=loop_config["train"],
    )
    training = {"epoch": metrics["epoch"], "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "metrics": metrics}
    with tempfile.TemporaryDirectory() as folder:
        save_bundle(Path(folder) / CHECKPOINT_FILE, bundle, training)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _log_epoch(tracking_uri: str, run_id: str, metrics: dict[str, float]) -> None:
    """Per-epoch metrics into the driver's MLflow run (rank 0 only)."""
    import mlflow
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    step = int(metrics["epoch"])
    entries = [Metric(key, float(value), stamp, step) for key, value in metrics.items() if key != "epoch"]
    mlflow.MlflowClient(tracking_uri).log_batch(run_id, metrics=entries)


def _resume(network: nn.Module, optimizer, scheduler) -> int:
    """Load the latest checkpoint of this run, if any; returns the first epoch to train."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        data = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    bundle = bundle_from_dict(data)
    _unwrap(network).load_state_dict(bundle.state_dict)
    optimizer.load_state_dict(data["training"]["optimizer"])
    scheduler.load_state_dict(data["training"]["scheduler"])
    LOG.info("resumed from the checkpoint of epoch %d", data["training"]["epoch"])
    return int(data["training"]["epoch"])


def evaluate_on_shards(predictor: FacePredictor, shards: str, manifest: dict[str, Any],
                       batch_size: int = 64) -> dict[str, Any]:
    """AFLW2000-3D figures of a predictor (``bundle.predictor()``, or a
    :class:`models.predictor.MeanFacePredictor` for the baseline) from the evaluation shards
    ``frnet preprocess --aflw2000`` wrote: crops by the benchmark rule, landmarks mapped back
    through each ROI box, 2D NME against ``pt3d_68``, binned by |yaw| (see
    :func:`models.evaluation.aflw2000_report`)."""
    import pyarrow.parquet as pq

    from models.evaluation import aflw2000_report
    from preprocessing.geometry import crop_to_image, nme, param_frame_to_crop

    if "aflw2000" not in manifest:
        raise ValueError(f"{shards}: no AFLW2000-3D shards (preprocess with --aflw2000)")
    filesystem, root = resolve(shards)
    image_format = manifest["image_format"]
    errors, yaws, stems = [], [], []
    for name in manifest["aflw2000"]["shards"]:
        table = pq.read_table(f"{root}/{name}", filesystem=filesystem,
                              columns=["id", "image", "roi_box", "pt3d_68", "yaw"])
        for start in range(0, table.num_rows, batch_size):
            rows = table.slice(start, batch_size).to_pylist()
            crops = np.stack([decode_image(r["image"], image_format, CROP_SIZE) for r in rows])
            params = predictor.predict_params(crops)
            for row, param in zip(rows, params, strict=True):
                crop_points = param_frame_to_crop(predictor.model.landmarks(param))
                predicted = crop_to_image(crop_points, np.asarray(row["roi_box"], dtype=np.float64))
                truth = np.asarray(row["pt3d_68"], dtype=np.float64).reshape(3, 68)
                errors.append(float(nme(predicted, truth)))
                yaws.append(abs(float(np.rad2deg(row["yaw"]))))
                stems.append(row["id"])
    return aflw2000_report(np.array(errors), np.array(yaws), stems)
