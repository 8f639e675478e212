"""Training configuration: ``configs/train.yaml`` read into frozen dataclasses.

The same dotted keys are what Tune search spaces name (``loss.lambda1``, ``optim.lr``, ...).
Every number declares its range and every name its rule in the annotation
(:class:`pipeline.runtime.config.Range`, :data:`pipeline.runtime.config.NAME`); loading enforces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from models.architectures import ARCHITECTURES
from models.losses import NUM_RESAMPLED, WING_EPSILON, WING_OMEGA
from pipeline.runtime.config import AT_LEAST_1, NAME, NON_NEGATIVE, POSITIVE, SEED_RANGE, Range


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mobile-frnet"
    width: Annotated[float, POSITIVE] = 1.0

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")


@dataclass(frozen=True)
class LossConfig:
    """``lambda1 * WPDC + lambda2 * Wing(omega, epsilon)``."""

    lambda1: Annotated[float, NON_NEGATIVE] = 1.0
    lambda2: Annotated[float, NON_NEGATIVE] = 0.05
    omega: Annotated[float, POSITIVE] = WING_OMEGA
    epsilon: Annotated[float, POSITIVE] = WING_EPSILON
    num_resampled: Annotated[int, NON_NEGATIVE] = NUM_RESAMPLED

    def __post_init__(self) -> None:
        if self.lambda1 + self.lambda2 == 0:
            raise ValueError(f"lambda1 and lambda2 cannot both be 0, got {self.lambda1}, {self.lambda2}")


@dataclass(frozen=True)
class OptimConfig:
    """3DDFA's recipe by default (SGD Nesterov, warm-up, x0.2 steps); AdamW + cosine as option."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, POSITIVE] = 0.02
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9
    nesterov: bool = True
    weight_decay: Annotated[float, NON_NEGATIVE] = 5e-4
    warmup_epochs: Annotated[int, NON_NEGATIVE] = 5
    warmup_factor: Annotated[float, Range(gt=0, le=1)] = 0.2  # lr * factor during the warm-up epochs
    # sgd: epochs where lr is multiplied by gamma
    milestones: tuple[Annotated[int, AT_LEAST_1], ...] = (30, 40)
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.2
    # The global batch (workers x data.batch_size) ``lr`` was tuned for, and how lr follows
    # another: linear (lr x global / reference, with the warm-up above) or none.
    reference_batch: Annotated[int, AT_LEAST_1] = 256
    lr_scaling: Literal["linear", "none"] = "none"

    def __post_init__(self) -> None:
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must increase, got {list(self.milestones)}")


# A batch drawn from a buffer of this many batches' worth of rows, each source's crops side by
# side, holds about SHUFFLE_SPREAD * (1 - exp(-1 / SHUFFLE_SPREAD)) = 94% distinct sources.
SHUFFLE_SPREAD = 8


@dataclass(frozen=True)
class DataConfig:
    shards: str = "data/shards"  # a `frnet preprocess` output folder or URI
    batch_size: Annotated[int, AT_LEAST_1] = 128  # per worker
    # Rows per worker in the local shuffle buffer; None sizes it from the data (shuffle_rows).
    shuffle_buffer: Annotated[int, AT_LEAST_1] | None = None
    shuffle_files: bool = True  # a new seeded order of the training shards every epoch
    # Per worker and epoch, training and validation; None: all.
    max_batches: Annotated[int, AT_LEAST_1] | None = None
    eval_batch_size: Annotated[int, AT_LEAST_1] = 256
    # Decode the crops once into Ray's object store and train every epoch from there: for sets
    # that fit in memory (43 KB a crop decoded, against about 5.5 KB as JPEG in the shards).
    cache_decoded: bool = False
    # Object-store memory (MiB, all workers together) Ray Data may fill with decoded crops ahead
    # of the training workers (a shard file decodes to about 40 MiB); None: Ray's own limit, a
    # share of the whole object store.
    read_ahead_mib: Annotated[int, AT_LEAST_1] | None = 2048

    def shuffle_rows(self, crops_per_source: int) -> int:
        """The local shuffle buffer in rows: as set, or enough that the crops one source gives
        (stored side by side) spread over SHUFFLE_SPREAD batches' worth of rows."""
        if self.shuffle_buffer is not None:
            return self.shuffle_buffer
        return self.batch_size * crops_per_source * SHUFFLE_SPREAD


def check_extra_resources(resources: dict[str, float]) -> None:
    """Extra resources per worker: not CPU or GPU (their own keys set those); the amounts' range
    is :data:`RESOURCE_AMOUNT`'s."""
    for name in resources:
        if name in ("CPU", "GPU"):
            raise ValueError(f"resources_per_worker: set {name} with {name.lower()}s_per_worker")


# Custom resources per worker (`ray start --resources`): amounts >= 0.
RESOURCE_AMOUNT = NON_NEGATIVE


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: Annotated[int, AT_LEAST_1] = 2
    use_gpu: bool = False
    # Leave CPUs to Ray Data: reserving them all stalls its reads; 0 would let workers pile up.
    cpus_per_worker: Annotated[float, POSITIVE] = 0.4
    # With use_gpu; a fraction lets small trials share a GPU.
    gpus_per_worker: Annotated[float, POSITIVE] = 1.0
    # Ray placement of the workers: PACK fills one node first; SPREAD puts them on different nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # More Ray resources per worker, beyond CPU and GPU: custom resources nodes declare with
    # `ray start --resources`, to choose the nodes a run may use.
    resources_per_worker: dict[str, Annotated[float, RESOURCE_AMOUNT]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_extra_resources(self.resources_per_worker)


@dataclass(frozen=True)
class RunConfig:
    # One run per name; `frnet train --resume` continues an unfinished one. It names the run's
    # folder and model file, so it is a NAME: no path separators.
    name: Annotated[str, NAME] = "mobile-frnet"
    storage_path: str = ""  # empty: RUN_DIR/ray; shared storage (s3://, NFS) on a cluster
    max_failures: Annotated[int, Range(ge=-1)] = 2  # Ray's FailureConfig: -1 retries forever
    keep_checkpoints: Annotated[int, AT_LEAST_1] = 3  # the best by validation NME


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = ""  # empty: sqlite:///<abs run dir>/mlflow.db
    experiment: Annotated[str, NAME] = "mobile-frnet"
    registered_model: Annotated[str, NAME] = "mobile-frnet"


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
    epochs: Annotated[int, AT_LEAST_1] = 50
    seed: Annotated[int, SEED_RANGE] = 0
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
