"""Whether a training run may start: a run name is used once, and continued only on purpose.

A run is known by its ``run.name``: an MLflow run of that name in the experiment, and Ray
Train's checkpoints under STORAGE/NAME (which Ray Train would otherwise pick up silently).
Without ``--resume`` a known name is refused; with it, the run must be unfinished and the config
must equal the one its latest checkpoint was trained with, key for key (before its first
checkpoint: the params its MLflow run logged). The training then goes on in the same MLflow run,
so its curves stay one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
from ray.train.v2.api.exceptions import RayTrainError

from models.checkpoint import load_bundle
from pipeline.runtime.cluster_storage import storage_location
from pipeline.runtime.config import ConfigError, to_plain
from pipeline.runtime.tracking import current_store, find_run_by_name, flatten, logged_params
from pipeline.training.config import TrainConfig
from pipeline.training.trainer import epoch_figures
from pipeline.training.worker import CHECKPOINT_FILE
from preprocessing.datasets import resolve

CHECKPOINT_PREFIX = "checkpoint_"
FINISHED = "FINISHED"


@dataclass(frozen=True)
class PreviousRun:
    """What is left of a run name: its MLflow run (id, status) and its latest checkpoint."""

    run_id: str | None
    status: str | None
    checkpoint: str | None  # the latest checkpoint folder (a path or URI)

    @property
    def exists(self) -> bool:
        return self.run_id is not None or self.checkpoint is not None


def previous_run(config: TrainConfig, run_dir: Path, experiment_id: str) -> PreviousRun:
    """The run of ``config.run.name`` in the MLflow experiment and in the storage."""
    found = find_run_by_name(experiment_id, config.run.name)
    return PreviousRun(*(found or (None, None)), latest_checkpoint(run_folder(config, run_dir)))


def run_folder(config: TrainConfig, run_dir: Path) -> str:
    """Ray Train's folder of the run ``config.run.name`` (a path or URI)."""
    return f"{storage_location(config.run.storage_path, run_dir).rstrip('/')}/{config.run.name}"


def latest_checkpoint(folder: str) -> str | None:
    """The newest ``checkpoint_*`` folder of a Ray Train run folder (names sort by time)."""
    filesystem, root = resolve(folder)
    try:
        entries = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    names = sorted(entry.base_name for entry in entries
                   if entry.type == pafs.FileType.Directory and entry.base_name.startswith(CHECKPOINT_PREFIX))
    return f"{folder}/{names[-1]}" if names else None


def last_saved(config: TrainConfig, run_dir: Path) -> tuple[str, int] | None:
    """The checkpoint a resumed run starts from (folder, epoch), or None: the latest that Ray
    Train registered. A run stopped while its workers report may leave newer folders that were
    never registered; a resumed run does not read those."""
    saved = registered_checkpoint(config, run_dir)
    return None if saved is None else (saved[0], int(saved[1]["epoch"]))


def saved_epoch_metrics(config: TrainConfig, run_dir: Path) -> dict[str, Any] | None:
    """The figures of the epoch a resumed run starts after (as rank 0 reported them with its
    checkpoint, which Ray Train's record of the run keeps), or None where there is no checkpoint."""
    saved = registered_checkpoint(config, run_dir)
    return None if saved is None else epoch_figures(saved[1])


def registered_checkpoint(config: TrainConfig, run_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """The latest checkpoint Ray Train registered for the run (folder, the metrics reported with
    it), from its record of the run, or None."""
    folder = run_folder(config, run_dir)
    try:
        result = ray.train.Result.from_path(folder)
    except (RuntimeError, RayTrainError):  # no run folder, no checkpoint registered, a record half written
        return None
    if result.checkpoint is None:
        return None
    return f"{folder}/{Path(result.checkpoint.path).name}", result.metrics


def checkpoint_config(checkpoint: str) -> tuple[dict[str, Any], int]:
    """The config a checkpoint was trained with (plain data) and its epoch."""
    filesystem, path = resolve(checkpoint)
    with ray.train.Checkpoint(path, filesystem=filesystem).as_directory() as folder:
        bundle, training = load_bundle(Path(folder) / CHECKPOINT_FILE)
    return to_plain(bundle.config), int((training or {}).get("epoch", 0))


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs (or exists on one side)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, "(absent)"), new.get(key, "(absent)")
        if isinstance(before, dict) and isinstance(after, dict):
            lines += differences(before, after, f"{prefix}{key}.")
        elif before != after:
            lines.append(f"{prefix}{key}: {before} -> {after}")
    return lines


def run_to_continue(config: TrainConfig, run_dir: Path, experiment_id: str, resume: bool) -> str | None:
    """The MLflow run id to log into (None: a new run), or a ConfigError that names the way out."""
    name = config.run.name
    found = previous_run(config, run_dir, experiment_id)
    if not resume:
        if found.exists:
            where = [f"MLflow run {found.run_id} ({found.status.lower()})" if found.run_id else "",
                     f"checkpoints in {found.checkpoint.rsplit('/', 1)[0]}" if found.checkpoint else ""]
            raise ConfigError(f"a run named {name!r} exists ({', '.join(w for w in where if w)} in "
                              f"{current_store()}): give another name (--name or run.name) for a new run, "
                              "or --resume to continue it")
        return None
    if not found.exists:
        raise ConfigError(f"--resume: no run named {name!r} to continue in {current_store()}")
    if found.status == FINISHED:
        raise ConfigError(f"--resume: the run named {name!r} (MLflow run {found.run_id}) finished; "
                          "give another name (--name or run.name) for a new run")
    if found.checkpoint is not None:
        old, epoch = checkpoint_config(found.checkpoint)
        changed, source = differences(old, to_plain(asdict(config))), f"its checkpoint of epoch {epoch}"
    else:  # stopped before its first checkpoint: what its MLflow run logged
        changed = param_changes(logged_params(found.run_id), flatten(asdict(config)))
        source = f"the params of MLflow run {found.run_id}; no checkpoint yet"
    if changed:
        raise ConfigError(f"--resume: the config differs from the one run {name!r} was trained with "
                          f"({source}): {'; '.join(changed)}. Resume with that config, or start a new "
                          "run under another name (--name or run.name)")
    return found.run_id


def param_changes(logged: dict[str, str], params: dict[str, str]) -> list[str]:
    """``key: old -> new`` for every param logged already whose value ``params`` changes (MLflow
    refuses to change a logged param)."""
    return [f"{key}: {logged[key]} -> {params[key]}" for key in sorted(set(logged) & set(params))
            if logged[key] != params[key]]
