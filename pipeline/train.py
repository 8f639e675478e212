"""Train Mobile-FRNet with Ray Train (DDP) on the Parquet shards, tracked in MLflow.

    frnet train --config configs/train.yaml [--shards DIR] [--storage DIR] [--epochs N] [--run-dir DIR]
    frnet train --config configs/train.yaml --name NAME --resume     # continue an unfinished run
    python pipeline/train.py --config configs/train.yaml
    ray submit cluster.yaml pipeline/train.py -- --config configs/cluster/train.yaml

Runs on the Ray cluster it finds (RAY_ADDRESS, or a running local one), else starts a local one.
What a run does: :mod:`pipeline.training.run`. Ctrl-C stops a run with exit status 130, printing the
checkpoint it saved and the command that resumes it; a run Ray Train gives up on (its storage gone
while it records a checkpoint, its retries spent) prints the same and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import ray

from pipeline.data.shard_reader import shard_read_failure
from pipeline.registration.gate import registration_scope, yaw_cells
from pipeline.runtime.config import ConfigError, load_config, with_overrides
from pipeline.runtime.console import run_main
from pipeline.runtime.paths import check_shards_readable, input_path, shards_location, shards_source
from pipeline.runtime.ray_session import RayStartError, check_num_cpus, start_ray
from pipeline.runtime.stage_tools import setup_logging, stage_parser, write_json
from pipeline.training.config import TrainConfig
from pipeline.training.run import TrainingFailed, TrainingInterrupted, TrainingResult, plan_run, train

LOG = logging.getLogger("frnet.train")
# The shell's status for a command stopped by Ctrl-C (128 + SIGINT).
INTERRUPTED = 130


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("frnet train", __doc__, inputs_rule=True)
    parser.add_argument("--config", type=Path, default=Path("configs/train.yaml"),
                        help="YAML with TrainConfig's keys (default: configs/train.yaml)")
    parser.add_argument("--shards", help="override data.shards: a `frnet preprocess` output")
    parser.add_argument("--storage", help="override run.storage_path: checkpoints (on a cluster of "
                        "several nodes, a folder every node mounts or s3://)")
    parser.add_argument("--epochs", type=int, help="override epochs")
    parser.add_argument("--name", help="override run.name (a name in use is refused unless --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished run of this name (same config) in its MLflow run")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/default"),
                        help="where the Ray run, the MLflow store and the model file go")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray started here (default: all)")
    parser.add_argument("--json", type=Path, help="write the run's figures here (default: not written)")
    return parser.parse_args(argv)


def load_train_config(args: argparse.Namespace) -> TrainConfig:
    """The config file with the flags over it; its shard folder found by the input-path rule."""
    flags = (("data.shards", args.shards), ("run.storage_path", args.storage), ("epochs", args.epochs),
             ("run.name", args.name))
    overrides = {key: value for key, value in flags if value is not None}
    config_path = input_path(args.config, "--config")
    config = load_config(config_path, TrainConfig, overrides)
    shards = shards_location(config.data.shards, args.shards is not None, args.config)
    return with_overrides(config, {"data.shards": shards}, source="command line")


def resume_command(argv: list[str], name: str, run_dir: Path) -> str:
    """The command that resumes the run ``name``: the same arguments, ``--name NAME --resume``
    and the run directory spelt out."""
    kept: list[str] = []
    arguments = iter(argv)
    for argument in arguments:
        if argument == "--name":
            next(arguments, None)
        elif not argument.startswith("--name=") and argument != "--resume":
            kept.append(argument)
    if not any(argument == "--run-dir" or argument.startswith("--run-dir=") for argument in kept):
        kept += ["--run-dir", str(run_dir)]
    return shlex.join(["frnet", "train", *kept, "--name", name, "--resume"])


def interrupted(stop: TrainingInterrupted | TrainingFailed, argv: list[str], run_dir: Path) -> str:
    """What a Ctrl-C or a failed run left: the checkpoint saved, the MLflow run's state, the
    command to resume."""
    if stop.saved is None:
        saved = "no checkpoint to resume from (none registered yet)"
    elif isinstance(stop.saved, OSError):
        saved = f"not known (looking it up failed: {str(stop.saved).splitlines()[0]})"
    else:
        saved = f"the checkpoint of epoch {stop.saved[1]} in {stop.saved[0]}"
    how, state = ("failed", "FAILED") if isinstance(stop, TrainingFailed) else ("interrupted", "KILLED")
    return (f"{how}: run {stop.name!r} stopped; saved: {saved}; MLflow run {stop.run_id} marked "
            f"{state}\nresume with: {resume_command(argv, stop.name, run_dir)}")


def print_summary(result: TrainingResult) -> None:
    """The run's closing lines: best epoch, files, and the registration's table (its champion line
    was logged when it was decided)."""
    best = result.best
    print(f"\nbest epoch {best['epoch']}: validation NME {100 * best['val_nme']:.3f}%"
          f"{' (synthetic data)' if result.synthetic_data else ''}")
    print(f"model file: {result.model_file}\nMLflow run {result.run_id} in {result.tracking_uri}")
    registration = result.registration
    if registration is not None and registration.aflw2000 is not None:
        print(f"AFLW2000-3D NME by |yaw| bin (%), {registration_scope(registration)}:  "
              f"{yaw_cells(registration.aflw2000)}")
        state = "now the champion" if registration.champion else "registered; the champion stays"
        print(f"model {registration.registered_model} version {registration.model_version}: {state}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        return train_command(args)
    except TrainingInterrupted as stop:
        print(interrupted(stop, argv, args.run_dir), file=sys.stderr)
        return INTERRUPTED
    except TrainingFailed as stop:
        LOG.error("run %r (checkpoints in %s) stopped: Ray Train gave up on it: %s", stop.name, stop.folder,
                  stop.reason)
        print(interrupted(stop, argv, args.run_dir), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted before training started: nothing saved", file=sys.stderr)
        return INTERRUPTED


def train_command(args: argparse.Namespace) -> int:
    """The run of the parsed arguments; its exit status. Every check that needs no Ray (the
    config, the shards, the run name) answers before Ray starts."""
    try:
        check_num_cpus(args.num_cpus)
        config = load_train_config(args)
        check_shards_readable(config.data.shards, shards_source(args.shards is not None, args.config))
        plan = plan_run(config, args.run_dir, resume=args.resume)
        start_ray(args.num_cpus, logging_level=logging.WARNING)
    except (ConfigError, RayStartError) as err:  # RayStartError: --num-cpus with a cluster to join
        LOG.error("%s", err)
        return 2
    except (FileNotFoundError, ValueError) as err:  # a ShardError: shards unlike their manifest
        LOG.error("%s", err)
        return 1
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        result = train(config, args.run_dir, resume=args.resume, plan=plan)
    except ConfigError as err:
        LOG.error("%s", err)
        return 2
    except TrainingFailed:
        raise
    except Exception as err:
        failure = shard_read_failure(err)  # met while training, wrapped by Ray Data and Ray Train
        if failure is not None:
            LOG.error("%s (read while training: the run stopped; make the shards whole, then resume with "
                      "--resume)", failure)
            return 1
        if isinstance(err, (FileNotFoundError, ValueError)):
            LOG.error("%s", err)
            return 1
        raise
    print_summary(result)
    write_json(args.json, result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
