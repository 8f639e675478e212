"""Ray Tune sweeps over the loss weights, Wing's omega/epsilon and any other training key.

    frnet tune --config configs/tune.yaml --space tune_spaces/default.yaml [--shards DIR] [--run-dir DIR]
    python pipeline/tune.py --config configs/tune.yaml --space tune_spaces/small.yaml
    ray submit cluster.yaml pipeline/tune.py -- --config configs/cluster/tune.yaml \\
        --space tune_spaces/default.yaml
    frnet tune ... --resume      # continue the interrupted sweep of the same name
    frnet tune --config C --storage S --name N --resume   # ... from another head, given its storage

What a sweep does: :mod:`pipeline.sweeps.run`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import ray

from pipeline.registration.gate import registration_scope
from pipeline.runtime.config import ConfigError
from pipeline.runtime.console import run_main
from pipeline.runtime.paths import input_path, shards_location
from pipeline.runtime.ray_session import RayStartError, check_num_cpus, start_ray
from pipeline.runtime.stage_tools import setup_logging, stage_parser, write_json
from pipeline.sweeps.config import load_sweep_config, plan_sweep
from pipeline.sweeps.run import SweepInterrupted, SweepRequest, SweepResult, run_sweep

LOG = logging.getLogger("frnet.tune")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("frnet tune", __doc__, inputs_rule=True)
    parser.add_argument("--config", type=Path, default=Path("configs/tune.yaml"),
                        help="the sweep's YAML (default: configs/tune.yaml)")
    parser.add_argument("--space", type=Path, help="the search space (tune_spaces/NAME.yaml); "
                        "with --resume, the sweep's own copy is used")
    parser.add_argument("--shards", help="override the base config's data.shards")
    parser.add_argument("--storage", help="override the sweep's storage_path: trial checkpoints (on a "
                        "cluster of several nodes, a folder every node mounts or s3://)")
    parser.add_argument("--name", help="override the sweep's name")
    parser.add_argument("--epochs", type=int, help="override the epochs per trial (ASHA's max_t)")
    parser.add_argument("--num-samples", type=int, help="override the space's num_samples")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name "
                        "(read from its storage: any head with the same storage path can)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/default"),
                        help="where the Ray results, the MLflow store and the model files go")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray started here (default: all)")
    parser.add_argument("--json", type=Path, help="write the sweep's figures here (default: not written)")
    args = parser.parse_args(argv)
    if not args.resume and args.space is None:
        parser.error(f"--space is required (unless --resume): the search space for {args.config}, e.g. "
                     "tune_spaces/default.yaml with configs/tune.yaml, tune_spaces/small.yaml with "
                     "configs/demo/tune.yaml (the demo's short trials)")
    return args


def print_summary(result: SweepResult) -> None:
    """The sweep's closing table, its best model and its registration (whose champion line was
    logged when it was decided)."""
    print(f"\nsweep {result.sweep}: {len(result.trials)} trials "
          f"(MLflow parent run {result.parent_run_id} in {result.tracking_uri})")
    for trial in result.trials:
        best = trial.best
        nme = f"{100 * best[1]:.3f}% at epoch {best[0]}" if best else "-"
        values = ", ".join(f"{k}={_short(v)}" for k, v in trial.searched.items())
        print(f"  {trial.trial_id}  {trial.state:<13}  val NME {nme:<22}  {values}")
    print(f"best trial {result.best_trial}; model file {result.best_model.model_file}"
          f"{' (synthetic data)' if result.synthetic_data else ''}")
    registration = result.best_model.registration
    if registration is not None and registration.aflw2000 is not None:
        state = "now the champion" if registration.champion else "registered; the champion stays"
        print(f"AFLW2000-3D NME {100 * registration.aflw2000['nme_mean_of_bins']:.2f}% (mean of yaw bins; "
              f"{registration_scope(registration)}); model {registration.registered_model} version "
              f"{registration.model_version}: {state}")
    print(f"table and plots: {result.sweep_dir}")
    print(f"train the best trial's config longer: frnet train --config {result.best_config}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def check_request(request: SweepRequest) -> None:
    """The sweep config with the flags over it, ``--num-samples``, and for a new sweep its base
    training config, shards and space against each other, all checked before Ray starts."""
    flags = (("name", request.name), ("epochs", request.epochs), ("storage_path", request.storage))
    overrides = {key: value for key, value in flags if value is not None}
    load_sweep_config(request.config, overrides)
    if request.num_samples is not None and request.num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {request.num_samples}")
    if not request.resume and request.space is not None:
        plan_sweep(request.config, request.space, overrides, request.shards, request.num_samples)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:  # the paths the command line names, before Ray starts
        check_num_cpus(args.num_cpus)
        request = SweepRequest(config=input_path(args.config, "--config"),
                               space=None if args.space is None else input_path(args.space, "--space"),
                               run_dir=args.run_dir, storage=args.storage, name=args.name,
                               shards=args.shards and shards_location(args.shards, True, args.config),
                               epochs=args.epochs, num_samples=args.num_samples, resume=args.resume)
        check_request(request)
        start_ray(args.num_cpus, logging_level=logging.WARNING)
    except (ConfigError, RayStartError) as err:
        LOG.error("%s", err)
        return 2
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        result = run_sweep(request)
    except SweepInterrupted as err:
        LOG.warning("%s", err)
        return 130
    except ConfigError as err:  # a sweep name in use, or none to resume
        LOG.error("%s", err)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        LOG.error("%s", err)
        return 1
    print_summary(result)
    write_json(args.json, result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
