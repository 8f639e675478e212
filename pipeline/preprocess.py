"""300W-LP (jpg + .mat) -> augmented, labelled Parquet shards with Ray Data.

    frnet preprocess --input data/300W_LP --output data/shards --aflw2000 data/AFLW2000
    python pipeline/preprocess.py --input s3://bucket/300W_LP --output s3://bucket/shards
    ray submit cluster.yaml pipeline/preprocess.py -- --config configs/cluster/preprocess.yaml \\
        --input s3://... --output s3://...

Runs on the Ray cluster it finds (RAY_ADDRESS, or a running local one), else starts a local one.
Bad files go to a quarantine table; ``--strict`` stops at the first instead, with one line naming
the file and the reason (exit status 1). A killed run, started again with the same arguments,
finishes the missing shards only.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import ray

from pipeline.runtime.cluster_storage import check_shared, preprocessing_folders
from pipeline.runtime.config import ConfigError, load_config, with_overrides
from pipeline.runtime.console import run_main
from pipeline.runtime.paths import input_path, model_source, readable_location
from pipeline.runtime.ray_session import RayStartError, check_num_cpus, start_ray
from pipeline.runtime.stage_tools import setup_logging, stage_parser, write_json
from preprocessing.dataflow import PreprocessConfig
from preprocessing.datasets import resolve
from preprocessing.errors import DatasetError
from preprocessing.manifest import MANIFEST_FILE
from preprocessing.ray_preprocess import OutputExistsError, mean_bytes_per_image, run_preprocess

LOG = logging.getLogger("frnet.preprocess")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("frnet preprocess", __doc__, inputs_rule=True)
    parser.add_argument("--input", required=True, help="300W-LP folder or URI")
    parser.add_argument("--output", required=True, help="shard folder or URI")
    parser.add_argument("--config", type=Path, default=Path("configs/preprocess.yaml"),
                        help="YAML with PreprocessConfig's keys (default: configs/preprocess.yaml)")
    parser.add_argument("--aflw2000", help="AFLW2000-3D folder or URI: also write evaluation shards")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards of another config or input in --output")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray started here (default: all)")
    parser.add_argument("--json", type=Path, help="write the run's figures here (default: not written)")
    return parser.parse_args(argv)


# How a DatasetError reads in a task's traceback text: "preprocessing.errors.<class>: <file>: <reason>".
_DATASET_ERROR_LINE = re.compile(r"^preprocessing\.errors\.\w+: (.+)$", re.MULTILINE)


def bad_file_line(err: BaseException) -> str | None:
    """``<file>: <reason>`` of the bad-file error a Ray failure carries, or None.

    A Ray task's error arrives as a RayTaskError whose ``cause`` is the error itself; Ray Data
    wraps it further in a UserCodeException whose own cause is not sent back to the driver, so
    there the error is found in the task's traceback text.
    """
    pending: list[BaseException | None] = [err]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ray.exceptions.RayTaskError):  # before DatasetError: it may subclass it
            pending.append(current.cause)
        elif isinstance(current, DatasetError):
            return str(current)
        pending += [current.__cause__, current.__context__]
    lines = _DATASET_ERROR_LINE.findall(str(err))
    return lines[-1] if lines else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        check_num_cpus(args.num_cpus)
        config = load_config(input_path(args.config, "--config"), PreprocessConfig)
        config = with_overrides(config, {"morphable_model": model_source(config.morphable_model,
                                                                          "morphable_model")}, "config")
        source = readable_location(args.input, "--input")
        aflw2000 = None if args.aflw2000 is None else readable_location(args.aflw2000, "--aflw2000")
        start_ray(args.num_cpus, dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except (ConfigError, RayStartError) as err:
        LOG.error("%s", err)
        return 2
    # One progress line per shard comes from this stage; Ray Data's own bars would interleave.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        check_shared(preprocessing_folders(source, args.output, aflw2000))
        manifest = run_preprocess(source, args.output, config, aflw2000_root=aflw2000,
                                  strict=args.strict, overwrite=args.overwrite)
    except OutputExistsError as err:  # shards of another config or input: --overwrite
        LOG.error("%s", err)
        return 2
    except (DatasetError, FileNotFoundError, ValueError) as err:  # --strict: the first bad file
        LOG.error("%s", err)
        return 1
    except ray.exceptions.RayError as err:  # a bad file raised inside a Ray task: one line too
        line = bad_file_line(err)
        if line is None:
            raise
        LOG.error("%s", line)
        return 1
    counts = manifest.counts
    print(f"\n{counts['inputs']} source files: {counts['written']} written, "
          f"{counts['quarantined']} quarantined, {counts['skipped']} skipped; "
          f"rows: {json.dumps(counts['rows'])}")
    if manifest.aflw2000 is not None:
        aflw = manifest.aflw2000.counts
        print(f"AFLW2000-3D: {aflw['inputs']} files: {aflw['written']} written, "
              f"{aflw['quarantined']} quarantined, {aflw['skipped']} skipped")
    where = args.output.rstrip("/") if "://" in args.output else manifest.output
    print(f"Manifest: {where}/{MANIFEST_FILE}")
    figures = {"counts": counts, "bytes_per_image": mean_bytes_per_image(*resolve(args.output)),
               "image_format": manifest.image_format}
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
