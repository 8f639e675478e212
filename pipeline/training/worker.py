"""The Ray Train worker loop: Mobile-FRNet on the shards, one epoch of training and one of
validation at a time, rank 0 reporting each epoch with a checkpoint.

The worker rebuilds its :class:`~pipeline.training.config.TrainConfig` and
:class:`WorkerInputs` from the plain data of ``train_loop_config``; the pieces it puts together
(networks, losses, the morphable model, whitening, the frame) live in ``models``. Workers read
no file by path but the shards, and log nowhere: each report carries the worker's node id, and
the driver's side (:class:`pipeline.training.trainer.EpochLogger`) writes the epochs to MLflow.
"""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from models.architectures import build_model
from models.checkpoint import ModelBundle, bundle_from_dict, save_bundle
from models.frame import nme_torch, normalise_input, param_frame_to_crop_torch
from models.losses import FRNetLoss, dewhiten
from models.morphable import MorphableModel
from models.params import ParamStats
from pipeline.runtime.config import from_dict
from pipeline.runtime.console import is_verbose, quiet_libraries
from pipeline.runtime.stage_tools import duration
from pipeline.training.config import OptimConfig, TrainConfig

LOG = logging.getLogger("frnet.train")
CHECKPOINT_FILE = "model.pt"
# Each report names the Ray node of the worker that made it.
NODE_ID_KEY = "node_id"


@dataclass(frozen=True)
class WorkerInputs:
    """What every worker needs besides the config: the shards' whitening statistics and the
    morphable model that labelled them, loaded once on the driver and put in the object store
    (``morphable_model``), with the source and identity that model files record, and the local
    shuffle buffer in rows (sized from the shards' crops per source)."""

    whitening: ParamStats
    morphable_model: ray.ObjectRef
    morphable_source: str
    morphable_identity: str
    shuffle_rows: int

    def to_dict(self) -> dict[str, Any]:
        """Plain data (and the model's object reference) for ``train_loop_config``."""
        return {"whitening": self.whitening.to_dict(), "morphable_model": self.morphable_model,
                "morphable_source": self.morphable_source, "morphable_identity": self.morphable_identity,
                "shuffle_rows": self.shuffle_rows}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerInputs:
        return cls(ParamStats.from_dict(data["whitening"]), data["morphable_model"], data["morphable_source"],
                   data["morphable_identity"], int(data["shuffle_rows"]))


def loop_config(config: TrainConfig, inputs: WorkerInputs) -> dict[str, Any]:
    """Ray Train's ``train_loop_config``: the config and the inputs as plain data."""
    return {"train": asdict(config), "inputs": inputs.to_dict()}


@dataclass
class Worker:
    """One worker's training state (mutable: the network, optimiser and scheduler train)."""

    config: TrainConfig
    inputs: WorkerInputs
    network: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: FRNetLoss
    face_model: MorphableModel
    device: torch.device
    rank: int
    world_size: int
    node_id: str
    label_mean: torch.Tensor  # (62,) float32 on the device: the whitening statistics
    label_std: torch.Tensor

    @property
    def use_gpu(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast on GPU when the config asks for it; a no-op otherwise."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_gpu and self.config.bf16)

    def network_input(self, images: torch.Tensor) -> torch.Tensor:
        inputs = normalise_input(images)
        if self.use_gpu and self.config.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs


@dataclass(frozen=True)
class EpochSums:
    """One epoch's training sums over every worker: losses weighted by samples, and the summed
    per-worker seconds."""

    loss: float
    wpdc: float
    wing: float
    samples: float
    seconds: float


# -- optimisation -----------------------------------------------------------------------------

def make_optimizer(network: nn.Module, config: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The optimiser of ``config`` at learning rate ``lr`` (the effective one, see TrainConfig.lr)."""
    if config.name == "sgd":
        return torch.optim.SGD(network.parameters(), lr=lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=config.weight_decay)
    return torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=config.weight_decay)


def lr_factor(epoch: int, config: OptimConfig, epochs: int) -> float:
    """Learning-rate multiplier of an epoch: warm-up, then steps (sgd) or cosine (adamw)."""
    if epoch < config.warmup_epochs:
        return config.warmup_factor
    if config.name == "sgd":
        return config.gamma ** sum(epoch >= m for m in config.milestones)
    span = max(1, epochs - config.warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - config.warmup_epochs) / span))


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


# -- the loop ---------------------------------------------------------------------------------

def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function (``loop_config`` from :func:`loop_config`)."""
    quiet_libraries(is_verbose())
    worker = start_worker(from_dict(TrainConfig, loop_config["train"], source="train_loop_config"),
                          WorkerInputs.from_dict(loop_config["inputs"]))
    first, started = _resume(worker), time.perf_counter()
    for epoch in range(first, worker.config.epochs):
        sums = train_epoch(worker, epoch)
        val_sum, val_count = validate(worker)
        lr = worker.optimizer.param_groups[0]["lr"]
        worker.scheduler.step()
        per_epoch = (time.perf_counter() - started) / (epoch - first + 1)
        report_epoch(worker, epoch_metrics(epoch, sums, val_sum, val_count, lr, worker.world_size),
                     seconds_left=per_epoch * (worker.config.epochs - epoch - 1))


def start_worker(config: TrainConfig, inputs: WorkerInputs) -> Worker:
    """Seeds, threads, the network wrapped for DDP, the optimiser, scheduler and loss."""
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    if config.deterministic:
        ray.train.torch.enable_reproducibility(seed=config.seed)
    torch.manual_seed(config.seed + rank)
    # Intra-op threads to match the CPUs Ray gave this worker; more would oversubscribe the node.
    torch.set_num_threads(max(1, round(config.scaling.cpus_per_worker)))
    face_model: MorphableModel = ray.get(inputs.morphable_model)
    network = build_model(config.model.arch, config.model.width)
    if device.type == "cuda" and config.channels_last:
        network = network.to(memory_format=torch.channels_last)
    network = ray.train.torch.prepare_model(network)
    optimizer = make_optimizer(network, config.optim, config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_factor(epoch, config.optim, config.epochs))
    loss_fn = FRNetLoss(config.loss.lambda1, config.loss.lambda2, inputs.whitening, face_model,
                        omega=config.loss.omega, epsilon=config.loss.epsilon,
                        num_resampled=config.loss.num_resampled)
    mean, std = (torch.tensor(values, dtype=torch.float32, device=device)
                 for values in (inputs.whitening.mean, inputs.whitening.std))
    return Worker(config, inputs, network, optimizer, scheduler, loss_fn, face_model, device, rank,
                  context.get_world_size(), ray.get_runtime_context().get_node_id(), mean, std)


def train_epoch(worker: Worker, epoch: int) -> EpochSums:
    """One pass over this worker's shard of the training set; sums over every worker."""
    config, device = worker.config, worker.device
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    worker.network.train()
    sums = np.zeros(4)  # loss, wpdc, wing, samples
    batches = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=config.data.batch_size, local_shuffle_buffer_size=worker.inputs.shuffle_rows,
        local_shuffle_seed=config.seed * 1000 + epoch + worker.rank, device=device,
    )
    for batch in itertools.islice(batches, config.data.max_batches):
        target = (batch["label"] - worker.label_mean) / worker.label_std
        with worker.autocast():
            prediction = worker.network(worker.network_input(batch["image"]))
        parts = worker.loss_fn(prediction.float(), target, generator)
        worker.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        worker.optimizer.step()
        n = len(target)
        sums += [parts.total.item() * n, parts.wpdc.item() * n, parts.wing.item() * n, n]
    seconds = time.perf_counter() - started
    return EpochSums(*_all_reduce([*sums, seconds], device))


def validate(worker: Worker) -> tuple[float, float]:
    """(sum of per-sample 2D NME in the crop, samples) over every worker's validation shard."""
    worker.network.eval()
    total, count = 0.0, 0
    batches = ray.train.get_dataset_shard("val").iter_torch_batches(
        batch_size=worker.config.data.eval_batch_size, device=worker.device)
    with torch.no_grad():
        for batch in itertools.islice(batches, worker.config.data.max_batches):
            with worker.autocast():
                prediction = worker.network(normalise_input(batch["image"]))
            params = dewhiten(prediction.float().double(), worker.inputs.whitening)
            predicted = param_frame_to_crop_torch(worker.face_model.landmarks(params))  # (B, 3, 68)
            nme = nme_torch(predicted, batch["landmarks"].double().reshape(-1, 3, 68))
            total += nme.sum().item()
            count += len(nme)
    return tuple(_all_reduce([total, count], worker.device))


def epoch_metrics(epoch: int, sums: EpochSums, val_sum: float, val_count: float, lr: float,
                  world_size: int) -> dict[str, float]:
    """The figures one epoch reports (``epoch`` counted from 1)."""
    samples = max(sums.samples, 1)
    metrics = {
        "epoch": epoch + 1, "train_loss": sums.loss / samples, "train_wpdc": sums.wpdc / samples,
        "train_wing": sums.wing / samples, "val_nme": val_sum / max(val_count, 1), "lr": lr,
        "samples_per_second": sums.samples / (sums.seconds / world_size),
    }
    metrics = {key: float(value) for key, value in metrics.items()}
    metrics["epoch"] = int(metrics["epoch"])
    if not math.isfinite(metrics["val_nme"]):  # diverged: rank it last, never as NaN
        metrics["val_nme"] = math.inf
    return metrics


def report_epoch(worker: Worker, metrics: dict[str, float], seconds_left: float = 0.0) -> None:
    """Every worker reports with its node id (a barrier); rank 0 logs the epoch's line (with the
    time the remaining epochs take at this run's pace) and attaches the checkpoint."""
    if worker.rank != 0:
        ray.train.report({**metrics, NODE_ID_KEY: worker.node_id})
        return
    config = worker.config
    LOG.info("epoch %d/%d  loss %.4f (wpdc %.4f, wing %.4f)  val NME %.3f%%  lr %.2e  %.0f samples/s  "
             "%s left", metrics["epoch"], config.epochs, metrics["train_loss"], metrics["train_wpdc"],
             metrics["train_wing"], 100 * metrics["val_nme"], metrics["lr"], metrics["samples_per_second"],
             duration(seconds_left))
    state = {k: v.detach().cpu() for k, v in _unwrap(worker.network).state_dict().items()}
    bundle = ModelBundle(
        arch=config.model.arch, width=config.model.width, state_dict=state,
        param_stats=worker.inputs.whitening, morphable_source=worker.inputs.morphable_source,
        morphable_identity=worker.inputs.morphable_identity, config=asdict(config),
    )
    training = {"epoch": metrics["epoch"], "optimizer": worker.optimizer.state_dict(),
                "scheduler": worker.scheduler.state_dict(), "metrics": metrics}
    with tempfile.TemporaryDirectory() as folder:
        save_bundle(Path(folder) / CHECKPOINT_FILE, bundle, training)
        ray.train.report({**metrics, NODE_ID_KEY: worker.node_id},
                         checkpoint=ray.train.Checkpoint.from_directory(folder))


# -- helpers ----------------------------------------------------------------------------------

def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if hasattr(network, "module") else network


def _resume(worker: Worker) -> int:
    """Load the latest checkpoint of this run, if any; returns the first epoch to train."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        data = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    bundle = bundle_from_dict(data)
    _unwrap(worker.network).load_state_dict(bundle.state_dict)
    worker.optimizer.load_state_dict(data["training"]["optimizer"])
    worker.scheduler.load_state_dict(data["training"]["scheduler"])
    LOG.info("resumed from the checkpoint of epoch %d", data["training"]["epoch"])
    return int(data["training"]["epoch"])
