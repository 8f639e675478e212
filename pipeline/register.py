"""Register a model file or a released checkpoint in the MLflow registry, through the same
evaluation gate as trained models.

    frnet register --checkpoint runs/x/models/mobile-frnet.pt --aflw2000 data/AFLW2000 --name mobile-frnet
    frnet register --checkpoint peers/3ddfa_v2_mb05_120x120.pth --arch mobilenet-v1 --width 0.5 \\
        --morphable bfm68:data/bfm68 --param-stats data/bfm68/param_mean_v2.txt,data/bfm68/param_std_v2.txt \\
        --tracking-uri http://HEAD:5000 --name peers --aflw2000 data/AFLW2000

``--checkpoint`` and the flags that go with it are ``frnet evaluate``'s. The model is logged in
the self-contained form (:mod:`models.served`) to a run of ``--experiment``; with ``--aflw2000``
it is scored on that AFLW2000-3D folder (``--protocol`` / ``--yaw-file`` as in ``frnet
evaluate``), the figures and the evaluation set (its digest, image count and scoring protocol)
become the version's tags, and ``champion`` moves to it only if the champion was measured on the
same set and this one beats it; one line says which and why. Without ``--aflw2000`` the version
is registered unscored and never becomes champion. Exit 2 for a bad argument, 1 for a bad
dataset file met while scoring.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from models.architectures import ARCHITECTURES, build_model, load_model
from models.checkpoint import ModelBundle
from models.face_models import load_face_model
from pipeline.evaluation.model_loading import check_model_args, parse_param_stats, read_model_file
from pipeline.evaluation.scoring import EvaluationSet, aflw2000_folder_set, aflw2000_reports, predict_aflw2000
from pipeline.registration.gate import register_scored
from pipeline.runtime.config import check_name
from pipeline.runtime.console import run_main
from pipeline.runtime.paths import input_location, input_path, local_file, model_source, readable_location
from pipeline.runtime.stage_tools import progress_logger, setup_logging, stage_parser, write_json
from pipeline.runtime.tracking import (
    active_run,
    log_params,
    log_served_model,
    open_store,
    set_tags,
    writable_store,
)
from preprocessing.benchmark_sets import Aflw2000Protocol
from preprocessing.datasets import list_aflw2000
from preprocessing.errors import DatasetError

LOG = logging.getLogger("frnet.register")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("frnet register", __doc__, inputs_rule=True)
    parser.add_argument("--checkpoint", required=True,
                        help="the project's model file, or with --arch a network checkpoint (a path or "
                             "an s3:// URI)")
    parser.add_argument("--arch", choices=list(ARCHITECTURES), help="read --checkpoint as bare weights")
    parser.add_argument("--width", type=float, default=1.0, help="with --arch: width multiplier")
    parser.add_argument("--morphable", help="with --arch: morphable model source (bfm68:FOLDER, ...)")
    parser.add_argument("--param-stats", help="with --arch: MEAN_FILE,STD_FILE whitening statistics")
    parser.add_argument("--name", default="mobile-frnet", help="the registered model (default: mobile-frnet)")
    parser.add_argument("--experiment", default="registered-checkpoints",
                        help="the MLflow experiment of the registering run")
    parser.add_argument("--tracking-uri", default="",
                        help="the MLflow store (default: sqlite:///RUN_DIR/mlflow.db)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/default"),
                        help="with the default store: where it and its artifacts live")
    parser.add_argument("--aflw2000",
                        help="AFLW2000-3D folder to score the model on (a path or an s3:// URI)")
    parser.add_argument("--protocol", type=Path, help="folder of 3DDFA's AFLW2000-3D arrays")
    parser.add_argument("--yaw-file", choices=("original", "new"), help="with --protocol: the yaw bins")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, help="the registration's figures (default: not written)")
    return parser.parse_args(argv)


def read_bundle(args: argparse.Namespace) -> ModelBundle:
    """The model the arguments name, as a model file would hold it; a ValueError says why not."""
    check_model_args(args)
    if args.arch is None:
        return read_model_file(input_location(args.checkpoint, "--checkpoint"))  # a URI: checked there
    checkpoint = local_file(args.checkpoint, "--checkpoint")
    stats = parse_param_stats(args.param_stats, lambda path: input_path(path, "--param-stats"))
    source = model_source(args.morphable, "--morphable")
    face_model = load_face_model(source)
    network = load_model(args.arch, args.width, checkpoint)  # ValueError names the file
    # Only what inference uses: a released checkpoint may carry training-only heads.
    keep = build_model(args.arch, args.width).state_dict().keys()
    weights = {key: value for key, value in network.state_dict().items() if key in keep}
    return ModelBundle(args.arch, args.width, weights, stats, source, face_model.identity)


def score(bundle: ModelBundle, args: argparse.Namespace) -> tuple[dict[str, Any], EvaluationSet] | None:
    """The AFLW2000-3D report of ``bundle`` on ``--aflw2000`` and the set it was measured on, or
    None without it."""
    if args.aflw2000 is None:
        if args.protocol is not None or args.yaw_file is not None:
            raise ValueError("--protocol and --yaw-file go with --aflw2000")
        return None
    if args.yaw_file is not None and args.protocol is None:
        raise ValueError(f"--yaw-file {args.yaw_file} needs --protocol")
    folder = readable_location(args.aflw2000, "--aflw2000")
    filesystem, refs = list_aflw2000(folder)
    protocol = Aflw2000Protocol.load(input_path(args.protocol, "--protocol")) if args.protocol else None
    if protocol is not None and len(protocol) != len(refs):
        raise ValueError(f"{args.protocol}: {len(protocol)} faces, but {folder} holds {len(refs)}; "
                         "use --protocol on the whole AFLW2000-3D folder only")
    LOG.info("AFLW2000-3D: %d faces in %s", len(refs), folder)
    predictions = predict_aflw2000(bundle.predictor(), filesystem, refs, args.batch_size,
                                   progress_logger(LOG, "AFLW2000-3D"), protocol)
    reports, _ = aflw2000_reports(predictions, protocol, args.yaw_file)
    return reports["aflw2000"], aflw2000_folder_set(filesystem, refs, protocol, args.yaw_file)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        check_name(args.name, "--name")
        writable_store(args.tracking_uri, args.run_dir)  # before the evaluation, which takes a while
        bundle = read_bundle(args)
        bundle.predictor()  # the weights fit the architecture and the morphable model is the one named
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        LOG.error("%s", err)
        return 2
    try:
        scored = score(bundle, args)
    except (ValueError, FileNotFoundError) as err:
        LOG.error("%s", err)
        return 2
    except DatasetError as err:
        LOG.error("%s", err)
        return 1
    open_store(args.tracking_uri, args.run_dir, args.experiment)
    with active_run(name=f"register-{args.name}") as run:
        log_params({"checkpoint": str(args.checkpoint), "arch": bundle.arch, "width": bundle.width,
                    "morphable_model": bundle.morphable_identity, "param_stats": bundle.param_stats.identity})
        set_tags({"registered_from": "checkpoint"})
        model_uri = log_served_model(bundle)
        figures = {"run_id": run.run_id, "tracking_uri": run.tracking_uri, "model_uri": model_uri,
                   **register_scored(*(scored or (None, None)), args.name, model_uri, run.run_id).to_json()}
    state = "now the champion" if figures["champion"] else (
        "registered; the champion stays" if scored is not None else "registered unscored; the champion stays")
    if scored is not None:
        report, evaluation_set = scored
        print(f"AFLW2000-3D NME {100 * report['nme_mean_of_bins']:.2f}% (mean of yaw bins, "
              f"{len(report['per_image'])} faces, set {evaluation_set.short})")
    print(figures["champion_reason"])
    print(f"model {args.name} version {figures['model_version']}: {state}\nin {figures['tracking_uri']}")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
