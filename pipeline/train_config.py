"""Training configuration: ``configs/train.yaml`` read into frozen dataclasses.

The same dotted keys are what Tune search spaces name (``loss.lambda1``, ``optim.lr``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from models.losses import NUM_RESAMPLED, WING_EPSILON, WING_OMEGA
from models.registry import ARCHITECTURES


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mobile-frnet"
    width: float = 1.0

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        if self.width <= 0:
            raise ValueError(f"width must be > 0, got {self.width}")


@dataclass(frozen=True)
class LossConfig:
    """``lambda1 * WPDC + lambda2 * Wing(omega, epsilon)``."""

    lambda1: float = 1.0
    lambda2: float = 0.05
    omega: float = WING_OMEGA
    epsilon: float = WING_EPSILON
    num_resampled: int = NUM_RESAMPLED

    def __post_init__(self) -> None:
        if self.lambda1 < 0 or self.lambda2 < 0 or self.lambda1 + self.lambda2 == 0:
            raise ValueError(f"need lambda1, lambda2 >= 0 and not both 0, got {self.lambda1}, {self.lambda2}")
        if self.omega <= 0 or self.epsilon <= 0:
            raise ValueError(f"Wing needs omega > 0 and epsilon > 0, got {self.omega}, {self.epsilon}")


@dataclass(frozen=True)
class OptimConfig:
    """3DDFA's recipe by default (SGD Nesterov, warm-up, x0.2 steps); AdamW + cosine as option."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: int = 5
    warmup_factor: float = 0.2  # lr * factor during the warm-up epochs
    milestones: tuple[int, ...] = (30, 40)  # sgd: epochs where lr is multiplied by gamma
    gamma: float = 0.2
    # The global batch (workers x data.batch_size) ``lr`` was tuned for, and how lr follows
    # another: linear (lr x global / reference, with the warm-up above) or none.
    reference_batch: int = 256
    lr_scaling: Literal["linear", "none"] = "none"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.reference_batch < 1:
            raise ValueError(f"reference_batch must be >= 1, got {self.reference_batch}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must increase, got {list(self.milestones)}")


# A batch drawn from a buffer of this many batches' worth of rows, each source's crops side by
# side, holds about SHUFFLE_SPREAD * (1 - exp(-1 / SHUFFLE_SPREAD)) = 94% distinct sources.
SHUFFLE_SPREAD = 8


@dataclass(frozen=True)
class DataConfig:
    shards: str = "data/shards"  # a `frnet preprocess` output folder or URI
    batch_size: int = 128  # per worker
    # Rows per worker in the local shuffle buffer; None sizes it from the data (shuffle_rows).
    shuffle_buffer: int | None = None
    shuffle_files: bool = True  # a new seeded order of the training shards every epoch
    max_batches: int | None = None  # per worker and epoch, training and validation; None: all
    eval_batch_size: int = 256
    # Decode the crops once into Ray's object store and train every epoch from there: for sets
    # that fit in memory (43 KB a crop decoded, against about 5.5 KB as JPEG in the shards).
    cache_decoded: bool = False
    # Object-store memory (MiB, all workers together) Ray Data may fill with decoded crops ahead
    # of the training workers (a shard file decodes to about 40 MiB); None: Ray's own limit, a
    # share of the whole object store.
    read_ahead_mib: int | None = 2048

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("shuffle_buffer", "max_batches", "read_ahead_mib"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {getattr(self, name)}")

    def shuffle_rows(self, crops_per_source: int) -> int:
        """The local shuffle buffer in rows: as set, or enough that the crops one source gives
        (stored side by side) spread over SHUFFLE_SPREAD batches' worth of rows."""
        if self.shuffle_buffer is not None:
            return self.shuffle_buffer
        return self.batch_size * crops_per_source * SHUFFLE_SPREAD


def check_extra_resources(resources: dict[str, float]) -> None:
    """Extra resources per worker: not CPU or GPU (their own keys set those), none negative."""
    for name, amount in resources.items():
        if name in ("CPU", "GPU"):
            raise ValueError(f"resources_per_worker: set {name} with {name.lower()}s_per_worker")
        if amount < 0:
            raise ValueError(f"resources_per_worker.{name} must be >= 0, got {amount}")


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.4  # leave CPUs to Ray Data: reserving them all stalls its reads
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction lets small trials share a GPU
    # Ray placement of the workers: PACK fills one node first; SPREAD puts them on different nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # More Ray resources per worker, beyond CPU and GPU: custom resources nodes declare with
    # `ray start --resources`, to choose the nodes a run may use.
    resources_per_worker: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_extra_resources(self.resources_per_worker)


@dataclass(frozen=True)
class RunConfig:
    name: str = "mobile-frnet"  # one run per name; `frnet train --resume` continues an unfinished one
    storage_path: str = ""  # empty: RUN_DIR/ray; shared storage (s3://, NFS) on a cluster
    max_failures: int = 2
    keep_checkpoints: int = 3  # the best by validation NME


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = ""  # empty: sqlite:///<abs run dir>/mlflow.db
    experiment: str = "mobile-frnet"
    registered_model: str = "mobile-frnet"


def effective_lr(optim: OptimConfig, global_batch: int) -> float:
    """The learning rate a run uses: ``optim.lr`` scaled to ``global_batch`` by its rule."""
    if optim.lr_scaling == "linear":
        return optim.lr * global_batch / optim.reference_batch
    return optim.lr


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    epochs: int = 50
    seed: int = 0
    deterministic: bool = False  # torch deterministic algorithms (slower)
    bf16: bool = True  # autocast on GPU
    channels_last: bool = True  # on GPU

    @property
    def global_batch(self) -> int:
        return self.scaling.num_workers * self.data.batch_size

    @property
    def lr(self) -> float:
        """The effective learning rate (:func:`effective_lr` at this config's global batch)."""
        return effective_lr(self.optim, self.global_batch)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
