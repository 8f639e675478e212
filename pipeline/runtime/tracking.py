"""MLflow for the stages: the tracking store, runs, model logging and the registry. Every MLflow
call of the project goes through this module.

The embedded default store is ``sqlite:///<absolute run dir>/mlflow.db`` (Ray Train moves each
worker's working directory, so the path is absolute); never the deprecated ``./mlruns`` store.
Runs are addressed two ways: the driver's active run (``mlflow.start_run``), and a
:class:`TrackingTarget` (store and run id) that workers and trials log to from anywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib.metadata import requires, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from packaging.requirements import Requirement

from models import served
from models.checkpoint import ModelBundle, bundle_to_dict, load_bundle
from models.face_models import load_face_model
from pipeline.runtime.config import ConfigError
from preprocessing.synth import example_crop

LOG = logging.getLogger("frnet.tracking")
CHAMPION = "champion"
# The figure a model is ranked by, stored as a version tag (lower is better).
RANKING_TAG = "aflw2000.nme_mean_of_bins"
# MLflow takes at most this many params in one batch.
PARAMS_PER_BATCH = 100
# The process that logs a driver's run, "HOST PID START" (START: its start time in clock ticks
# since boot, "" where /proc does not tell): a run left RUNNING by a process that is gone is stale.
DRIVER_TAG = "frnet.driver"
STALE_TAG = "frnet.ended_by"
KILLED = "KILLED"


# Per face 68 landmarks (crop pixels), pose (degrees), parameters. No input schema: with one,
# MLflow's server casts a JSON body to its dtype (floats 0..1 and booleans became uint8 and were
# scored); without, the model sees the array as sent and applies its own contract
# (models.served.as_crops), the same as in-process.
SERVED_SIGNATURE = ModelSignature(
    outputs=Schema([TensorSpec(np.dtype(np.float64), (-1, 68, 2), "landmarks"),
                    TensorSpec(np.dtype(np.float64), (-1, 3), "pose"),
                    TensorSpec(np.dtype(np.float64), (-1, 62), "params")]))


@dataclass(frozen=True)
class TrackingTarget:
    """One MLflow run in one store: where a worker or a trial logs."""

    tracking_uri: str
    run_id: str


def open_store(configured_uri: str, run_dir: Path, experiment: str) -> str:
    """Point this process at the store (:func:`tracking_uri`) and select ``experiment``;
    returns the experiment id."""
    mlflow.set_tracking_uri(tracking_uri(configured_uri, run_dir))
    return use_experiment(experiment, run_dir)


def use_store(uri: str) -> None:
    """Point this process at the store ``uri``."""
    mlflow.set_tracking_uri(uri)


def current_store() -> str:
    """The tracking URI this process logs to."""
    return mlflow.get_tracking_uri()


@contextmanager
def active_run(name: str | None = None, run_id: str | None = None) -> Iterator[TrackingTarget]:
    """Start (``name``) or continue (``run_id``) the driver's run, tagged with this process
    (:data:`DRIVER_TAG`); yields where it is. It ends FINISHED, FAILED on an error, and KILLED
    when Ctrl-C (KeyboardInterrupt) stops it."""
    with mlflow.start_run(run_name=name, run_id=run_id) as run:
        mlflow.set_tag(DRIVER_TAG, driver_identity())
        try:
            yield TrackingTarget(mlflow.get_tracking_uri(), run.info.run_id)
        except KeyboardInterrupt:
            mlflow.end_run(KILLED)
            raise


def driver_identity(pid: int | None = None) -> str:
    """``HOST PID START`` of a process (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()} {pid} {process_start(pid)}".rstrip()


def process_start(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot (field 22 of /proc/PID/stat), or ""
    where it is gone or /proc is absent. With the pid it tells a process from a later one that
    reuses the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split()[19]  # fields from the 3rd, after "pid (comm)"


def driver_gone(identity: str) -> bool:
    """Whether the driver ``identity`` names has certainly exited: it ran on this host and its pid
    is free or now another process's. A driver on another host cannot be checked from here."""
    host, _, rest = identity.partition(" ")
    pid_text, _, start = rest.partition(" ")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if start and Path("/proc/self/stat").exists():
        return process_start(pid) != start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def close_stale_runs(experiment_id: str) -> list[tuple[str, str]]:
    """Mark KILLED every run of the experiment left RUNNING by a driver on this host that has
    exited (killed hard: SIGKILL, a lost machine); returns their (run id, name)."""
    client = mlflow.MlflowClient()
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'")
    stale = [run for run in runs if run.data.tags.get(DRIVER_TAG) and driver_gone(run.data.tags[DRIVER_TAG])]
    for run in stale:
        _, pid, *_ = run.data.tags[DRIVER_TAG].split(" ")
        client.set_tag(run.info.run_id, STALE_TAG, f"its driver (pid {pid}) exited without ending it")
        client.set_terminated(run.info.run_id, KILLED)
        LOG.warning("MLflow run %s (%r) was left RUNNING by a driver that is gone (pid %s on this host): "
                    "marked KILLED", run.info.run_id, run.info.run_name, pid)
    return [(run.info.run_id, run.info.run_name) for run in stale]


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


def log_served_model(bundle: ModelBundle, example: np.ndarray | None = None, name: str = "model") -> str:
    """Log ``bundle`` as a self-contained pyfunc model (:mod:`models.served`): crops in,
    landmarks, pose and parameters out; its data (the morphable model's arrays included), the
    inference modules as its code, explicit requirements and a signature with ``example`` (a
    (120, 120, 3) BGR uint8 crop; default: a synthetic face) as the input example. Returns the
    logged model's URI."""
    face_model = load_face_model(bundle.morphable_source)
    example = example_crop() if example is None else example
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "data"
        served.write_model_folder(data, bundle_to_dict(bundle), face_model)
        code = Path(scratch) / "code" / "models"
        code.mkdir(parents=True)
        (code / "__init__.py").write_text("")
        source = Path(served.__file__).parent
        for module in served.MODULES:
            shutil.copy(source / f"{module}.py", code / f"{module}.py")
        batch = example[None] if example.ndim == 3 else example
        served.load_model_folder(data).predict(batch)  # what is logged answers its own example
        info = mlflow.pyfunc.log_model(
            name=name, loader_module="models.served", data_path=str(data), code_paths=[str(code)],
            pip_requirements=served_requirements(), signature=SERVED_SIGNATURE, input_example=batch)
    return info.model_uri


# OpenCV is used for crops and warps only: any release in the project's own range will do.
SERVED_RANGES = ("opencv-python-headless",)


def served_requirements() -> list[str]:
    """What a served model needs (public index names): MLflow, torch and numpy at the versions
    installed here, OpenCV in the range the project itself declares."""
    declared = {Requirement(text).name: str(Requirement(text)) for text in requires("mobile-frnet") or []}
    pinned = [f"{name}=={version(name).split('+')[0]}" for name in ("mlflow", "torch", "numpy")]
    return pinned + [declared.get(name, name) for name in SERVED_RANGES]


def register_version(model_uri: str, registered_model: str) -> str:
    """Register ``model_uri`` as a new version of ``registered_model``; returns its number. The
    two lines MLflow prints for it (model created, version created) go to the log at DEBUG: the
    gate says in one line what was registered and whether it became champion."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        version = str(mlflow.register_model(model_uri, registered_model).version)
    for line in printed.getvalue().splitlines():
        LOG.debug("%s", line)
    return version


# How long a tracking server has to answer its health route before a command that writes to it
# gives up (before any work): MLflow's own client retries a closed port for minutes.
STORE_ANSWER_S = 10
SQLITE_HEADER = b"SQLite format 3\x00"
FILE_STORE_SWITCH = "MLFLOW_ALLOW_FILE_STORE"


def store_problem(uri: str) -> str | None:
    """Why ``uri`` is no MLflow store a command can write to, or None: a server that does not
    answer ``/health`` within :data:`STORE_ANSWER_S`, an sqlite URI naming a folder or a file
    that is no SQLite database (a missing file is a new store), a plain folder (MLflow 3's file
    store, refused by MLflow unless switched on). Other schemes are left to MLflow."""
    if uri.startswith(("http://", "https://")):
        health = f"{uri.rstrip('/')}/health"
        try:
            with urllib.request.urlopen(health, timeout=STORE_ANSWER_S) as response:
                response.read(64)
        except urllib.error.HTTPError as err:
            return f"{health} answered HTTP {err.code}: not an MLflow tracking server"
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            return f"no MLflow server answered within {STORE_ANSWER_S} s ({reason})"
        return None
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if path.is_dir():
            return f"{path} is a folder, not an SQLite database file"
        if path.is_file() and path.stat().st_size > 0:
            with path.open("rb") as stream:
                if stream.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                    return f"{path} is not an SQLite database"
        elif not path.exists() and path.parent.is_file():
            return f"{path.parent} is a file, not a folder"
        return None
    file_store = "://" not in uri or uri.startswith("file:")
    if file_store and os.environ.get(FILE_STORE_SWITCH, "").lower() != "true":
        return (f"a folder is MLflow's file store, which MLflow 3 refuses unless {FILE_STORE_SWITCH}=true; "
                "give sqlite:///FOLDER/mlflow.db or a tracking server's http://HOST:PORT")
    return None


def writable_store(configured: str, run_dir: Path) -> str:
    """The store a command will write to (:func:`tracking_uri`, its folder not made yet),
    checked (:func:`store_problem`) before any work; a ConfigError names the flag, the URI and
    the reason."""
    uri = configured or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"
    problem = store_problem(uri)
    if problem is not None:
        raise ConfigError(f"--tracking-uri {uri}: {problem}; nothing was evaluated or registered")
    return uri


def existing_store(uri: str | None) -> str:
    """The store a look-up reads from: ``uri``, else ``MLFLOW_TRACKING_URI``; a ConfigError when
    neither is given or a local store does not exist (MLflow would create an empty one, and
    ``mlflow.db`` of the current folder is where it creates it when no URI is given)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ConfigError("--tracking-uri is needed with --model-uri: the MLflow store the model is "
                          "registered in (sqlite:///runs/demo/mlflow.db, http://HEAD:5000), or set "
                          "MLFLOW_TRACKING_URI")
    local = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else \
        None if "://" in uri else uri.removeprefix("file:")
    if local is not None and not Path(local).exists():
        raise ConfigError(f"--tracking-uri {uri}: no MLflow store there ({Path(local).resolve()} does "
                          "not exist); nothing was created")
    return uri


def bundle_from_model_uri(model_uri: str, tracking: str | None = None) -> ModelBundle:
    """The model file of a registered or logged model (``models:/NAME@ALIAS``, ``runs:/...``),
    with its morphable model read from the arrays logged beside it. Versions logged before the
    self-contained format (a pickled network with the model file under ``extra_files/``) still
    load: their morphable model is found by the source the file names."""
    mlflow.set_tracking_uri(existing_store(tracking))
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except mlflow.exceptions.MlflowException as err:
        store = mlflow.get_tracking_uri()
        raise ValueError(f"{model_uri}: cannot fetch from {store} ({err.message})") from err
    described = sorted(folder.rglob(served.META_FILE))
    if described:
        data_folder = described[0].parent
        bundle, _ = load_bundle(data_folder / served.MODEL_FILE)
        arrays = json.loads(described[0].read_text())["morphable_arrays"]
        return replace(bundle, morphable_source=f"3ddfa:{data_folder / arrays}")
    files = sorted((folder / "extra_files").glob("*.pt"))
    if len(files) != 1:
        raise ValueError(f"{model_uri}: neither a self-contained model ({served.META_FILE}) nor one "
                         f"model file under extra_files/ (found {len(files)}); register it again")
    bundle, _ = load_bundle(files[0])
    return bundle


def log_run_config(config: dict[str, Any], config_yaml: str, manifest: dict[str, Any],
                   tags: dict[str, str], prefix: str = "") -> None:
    """The active run's params (the flattened config), config files, the shards' manifest and tags."""
    log_params(flatten(config, prefix))
    mlflow.log_dict(config, "config.json")
    mlflow.log_text(config_yaml, "config.yaml")
    mlflow.log_dict(manifest, "manifest.json")
    mlflow.set_tags(tags)


def learning_rate_params(config: Any) -> dict[str, str]:
    """The effective learning rate of a TrainConfig and the global batch it follows, as params."""
    return {"optim.effective_lr": repr(config.lr), "optim.global_batch": str(config.global_batch)}


def log_params(params: dict[str, Any]) -> None:
    """Params of the active run, in batches MLflow accepts."""
    items = list(params.items())
    for start in range(0, len(items), PARAMS_PER_BATCH):
        mlflow.log_params(dict(items[start:start + PARAMS_PER_BATCH]))


def log_metrics(metrics: dict[str, float]) -> None:
    """Metrics of the active run."""
    mlflow.log_metrics(metrics)


def log_dict(data: dict[str, Any], artifact_file: str) -> None:
    """A JSON artifact of the active run."""
    mlflow.log_dict(data, artifact_file)


def log_artifact(path: Path, folder: str) -> None:
    """A file into the active run's artifacts under ``folder``."""
    mlflow.log_artifact(str(path), folder)


def set_tags(tags: dict[str, str]) -> None:
    """Tags of the active run."""
    mlflow.set_tags(tags)


def log_epoch_metrics(target: TrackingTarget, metrics: dict[str, float]) -> None:
    """One epoch's metrics into ``target``, at step ``metrics["epoch"]``."""
    stamp = int(time.time() * 1000)
    step = int(metrics["epoch"])
    entries = [Metric(key, float(value), stamp, step) for key, value in metrics.items() if key != "epoch"]
    mlflow.MlflowClient(target.tracking_uri).log_batch(target.run_id, metrics=entries)


def metric_history(target: TrackingTarget, key: str) -> list[float]:
    """The values of metric ``key`` of ``target``, in step order."""
    history = mlflow.MlflowClient(target.tracking_uri).get_metric_history(target.run_id, key)
    return [metric.value for metric in sorted(history, key=lambda metric: metric.step)]


def metric_steps(target: TrackingTarget, key: str) -> set[int]:
    """The steps at which ``target`` has logged metric ``key``."""
    return {metric.step for metric in mlflow.MlflowClient(target.tracking_uri).get_metric_history(
        target.run_id, key)}


def tag_run(target: TrackingTarget, key: str, value: str) -> None:
    mlflow.MlflowClient(target.tracking_uri).set_tag(target.run_id, key, value)


def end_run(target: TrackingTarget, status: str) -> None:
    """End ``target`` as FINISHED, KILLED or FAILED."""
    mlflow.MlflowClient(target.tracking_uri).set_terminated(target.run_id, status)


def find_run_by_name(experiment_id: str, name: str) -> tuple[str, str] | None:
    """(run id, status) of the newest run named ``name`` in the experiment, or None."""
    runs = mlflow.MlflowClient().search_runs([experiment_id], filter_string=f"attributes.run_name = '{name}'",
                                             order_by=["attributes.start_time DESC"], max_results=1)
    return (runs[0].info.run_id, runs[0].info.status) if runs else None


def logged_params(run_id: str) -> dict[str, str]:
    """The params a run has logged so far (strings, as :func:`flatten` writes them)."""
    return dict(mlflow.MlflowClient().get_run(run_id).data.params)


def nested_run(store: str, experiment_id: str, parent_run_id: str, name: str, tags: dict[str, str],
               params: dict[str, str]) -> TrackingTarget:
    """A run under ``parent_run_id`` (a sweep's trial); found again by its ``trial_id`` tag,
    and then set running again, when one exists already."""
    client = mlflow.MlflowClient(store)
    existing = find_nested_run(store, experiment_id, parent_run_id, tags["trial_id"])
    if existing:
        client.update_run(existing, status="RUNNING")
        return TrackingTarget(store, existing)
    run = client.create_run(experiment_id, run_name=name, tags={MLFLOW_PARENT_RUN_ID: parent_run_id, **tags})
    entries = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(entries), PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=entries[start:start + PARAMS_PER_BATCH])
    return TrackingTarget(store, run.info.run_id)


def find_nested_run(store: str, experiment_id: str, parent_run_id: str, trial_id: str) -> str:
    """The id of the run under ``parent_run_id`` tagged ``trial_id``, or "" when there is none."""
    runs = mlflow.MlflowClient(store).search_runs(
        [experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' and tags.trial_id = '{trial_id}'")
    return runs[0].info.run_id if runs else ""


def close_run(target: TrackingTarget, tags: dict[str, str], metrics: dict[str, float], status: str) -> None:
    """Tag, score and end ``target``."""
    client = mlflow.MlflowClient(target.tracking_uri)
    for key, value in tags.items():
        client.set_tag(target.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(target.run_id, key, value)
    client.set_terminated(target.run_id, status)
