"""Benchmark a model on AFLW2000-3D (68 and 21 points, 3D reconstruction) and on AFLW (21 points).

    frnet evaluate --checkpoint runs/x/model.pt --aflw2000 data/AFLW2000 --json eval/frnet.json
    frnet evaluate --checkpoint peers/3ddfa_v2_mb05_120x120.pth --arch mobilenet-v1 --width 0.5 \\
        --morphable bfm68:data/bfm68 --param-stats data/bfm68/param_mean_v2.txt,data/bfm68/param_std_v2.txt \\
        --aflw2000 data/AFLW2000 --protocol data/aflw2000-3d/protocol --yaw-file new --json eval/peer.json
    frnet evaluate --checkpoint runs/x/model.pt --aflw data/test.data --aflw-protocol data/aflw/protocol \\
        --json eval/aflw.json

``--checkpoint`` is the project's model file (:mod:`models.checkpoint`); with ``--arch`` it is a
bare network checkpoint instead (for ``mobilenet-v1`` a 3DDFA_V2 one), and ``--morphable`` and
``--param-stats MEAN_FILE,STD_FILE`` supply what the file lacks.

AFLW2000-3D (``--aflw2000``, the real folder or ``frnet synth --layout aflw2000-3d``): the 68
points against ``pt3d_68``, AFLW's 21 points, and for a dense morphable model the 3D
reconstruction; ``--protocol`` adds 3DDFA's reannotated landmarks and ``--yaw-file`` bins.
AFLW (``--aflw``): 21 points on 3DDFA's crops. Readers: :mod:`preprocessing.benchmark_sets`;
scoring: :mod:`pipeline.evaluation.scoring`.

Output: the figures as JSON (fractions; layout in :func:`models.metrics.aflw2000_report`;
``evaluation_set``: the AFLW2000-3D set's digest, image count and scoring protocol, which
``frnet register`` compares before it moves ``champion``),
pictures in ``--out`` (default: beside the JSON): the cumulative error distribution, NME by yaw
bin, and landmark overlays of the best, median and worst AFLW2000-3D faces; the NME table by yaw
bin on stdout. Exit 2 for a bad argument (missing folder, a file that is not a model, a bad
``--param-stats``), 1 for a bad dataset file met while evaluating.
"""


from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from models.architectures import ARCHITECTURES
from models.predictor import FacePredictor, MeanFacePredictor
from pipeline.evaluation.model_loading import check_model_args, load_predictor
from pipeline.evaluation.pictures import format_table, overlay_sheet, plot_cumulative_errors, plot_yaw_bins
from pipeline.evaluation.scoring import (
    FacePredictions,
    aflw2000_folder_set,
    aflw2000_reports,
    predict_aflw2000,
    score_aflw,
)
from pipeline.runtime.console import run_main
from pipeline.runtime.paths import readable_location
from pipeline.runtime.stage_tools import progress_logger, setup_logging, stage_parser, write_json
from preprocessing.benchmark_sets import Aflw2000Protocol, AflwSet
from preprocessing.datasets import SampleRef, list_aflw2000
from preprocessing.errors import DatasetError

LOG = logging.getLogger("frnet.evaluate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("frnet evaluate", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint",
                        help="the project's model file, or with --arch a network checkpoint (a path or "
                             "an s3:// URI)")
    source.add_argument("--model-uri", help="a registered model, e.g. models:/mobile-frnet@champion")
    parser.add_argument("--tracking-uri", help="with --model-uri: the MLflow store "
                                               "(default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--arch", choices=list(ARCHITECTURES),
                        help="read --checkpoint as bare weights of this network")
    parser.add_argument("--width", type=float, default=1.0, help="with --arch: width multiplier")
    parser.add_argument("--morphable", help="with --arch: morphable model source (bfm68:FOLDER, ...)")
    parser.add_argument("--param-stats", help="with --arch: MEAN_FILE,STD_FILE whitening statistics")
    parser.add_argument("--aflw2000",
                        help="AFLW2000-3D folder (imageNNNNN.jpg + .mat), a path or an s3:// URI")
    parser.add_argument("--protocol", type=Path, help="folder of 3DDFA's AFLW2000-3D arrays")
    parser.add_argument("--yaw-file", choices=("original", "new"),
                        help="with --protocol: bin by AFLW2000-3D.pose.npy or -new.pose.npy "
                             "(default: the .mat's Pose_Para)")
    parser.add_argument("--aflw", type=Path, help="AFLW in 3DDFA's test layout (AFLW_GT_crop/, .list)")
    parser.add_argument("--aflw-protocol", type=Path, help="folder of the AFLW arrays (default: --aflw)")
    parser.add_argument("--mean-face", action="store_true",
                        help="score the model's whitening mean (the mean face) for every face: the "
                             "baseline a trained model must beat")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--out", type=Path, help="folder for the pictures (default: beside --json)")
    parser.add_argument("--json", type=Path, help="write the figures here (default: not written)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Combinations argparse cannot check; a ValueError names the problem."""
    if args.aflw2000 is None and args.aflw is None:
        raise ValueError("nothing to evaluate: give --aflw2000 DIR and/or --aflw DIR")
    if args.protocol is not None and args.aflw2000 is None:
        raise ValueError("--protocol needs --aflw2000")
    if args.yaw_file is not None and args.protocol is None:
        raise ValueError(f"--yaw-file {args.yaw_file} needs --protocol (the folder with the yaw arrays)")
    if args.aflw_protocol is not None and args.aflw is None:
        raise ValueError("--aflw-protocol needs --aflw")
    check_model_args(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")



# -- the model ------------------------------------------------------------------------------------

# -- the stage ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    """Everything the arguments name, opened and checked before any prediction."""

    predictor: FacePredictor
    model_info: dict[str, Any]
    filesystem: pafs.FileSystem | None
    refs: list[SampleRef]
    protocol: Aflw2000Protocol | None
    aflw: AflwSet | None


def open_inputs(args: argparse.Namespace) -> Inputs:
    """Open the datasets and the model; any ValueError / FileNotFoundError is an argument error."""
    check_args(args)
    filesystem, refs, protocol = None, [], None
    if args.aflw2000 is not None:
        if "://" in args.aflw2000:
            readable_location(args.aflw2000, "--aflw2000")
        elif not Path(args.aflw2000).is_dir():
            raise ValueError(f"{args.aflw2000}: no such folder (--aflw2000)")
        filesystem, refs = list_aflw2000(args.aflw2000)
        if args.protocol is not None:
            protocol = Aflw2000Protocol.load(args.protocol)
            if len(refs) != len(protocol):
                raise ValueError(
                    f"{args.protocol}: the arrays describe {len(protocol)} faces by their position in "
                    f"sorted-file order, but {args.aflw2000} holds {len(refs)}; a partial folder cannot be "
                    "matched to the rows, so use --protocol on the whole AFLW2000-3D folder only")
    aflw = AflwSet.open(args.aflw, args.aflw_protocol) if args.aflw is not None else None
    # The model last: the folders are cheap to check and a typo there should not wait for it.
    predictor, model_info = load_predictor(args)
    return Inputs(predictor, model_info, filesystem, refs, protocol, aflw)


def write_pictures(inputs: Inputs, predictions: FacePredictions | None,
                   reports: dict[str, dict[str, Any]], out_dir: Path) -> dict[str, str]:
    """The three pictures into ``out_dir``; returns their paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"cumulative_errors": out_dir / "cumulative_errors.png", "yaw_bins": out_dir / "nme_by_yaw.png"}
    plot_cumulative_errors(reports, paths["cumulative_errors"])
    plot_yaw_bins(reports, paths["yaw_bins"])
    if predictions is not None:
        paths["overlays"] = out_dir / "landmark_overlays.png"
        errors = np.array(list(reports["aflw2000"]["per_image"].values()))
        mean_face = inputs.model_info.get("mean_face")
        name = "mean face (no network)" if mean_face else inputs.model_info["checkpoint"]
        overlay_sheet(name, inputs.filesystem, inputs.refs, predictions, errors, paths["overlays"])
    else:
        LOG.info("no AFLW2000-3D faces: the overlay sheet is left out (AFLW's 21 points have no outline)")
    return {name: str(path) for name, path in paths.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        inputs = open_inputs(args)
    except (ValueError, FileNotFoundError) as err:
        LOG.error("%s", err)
        return 2
    if args.mean_face:
        baseline = MeanFacePredictor(inputs.predictor.network, inputs.predictor.stats, inputs.predictor.model)
        inputs = replace(inputs, predictor=baseline, model_info={**inputs.model_info, "mean_face": True})
        LOG.info("scoring the mean face (the whitening mean) for every face, not the network")
    started = time.perf_counter()
    figures: dict[str, Any] = {"model": inputs.model_info}
    reports: dict[str, dict[str, Any]] = {}
    predictions = None
    try:
        if inputs.refs:
            LOG.info("AFLW2000-3D: %d faces in %s", len(inputs.refs), args.aflw2000)
            predictions = predict_aflw2000(inputs.predictor, inputs.filesystem, inputs.refs, args.batch_size,
                                           progress_logger(LOG, "AFLW2000-3D"), inputs.protocol)
            aflw2000, sources = aflw2000_reports(predictions, inputs.protocol, args.yaw_file)
            reports.update(aflw2000)
            figures.update(aflw2000)
            figures["aflw2000_sources"] = sources
            figures["yaw_file"] = args.yaw_file or "mat"
            evaluation_set = aflw2000_folder_set(inputs.filesystem, inputs.refs, inputs.protocol,
                                                 args.yaw_file)
            figures["evaluation_set"] = evaluation_set.to_dict()
            LOG.info("evaluation set %s: %d faces, %s", evaluation_set.short, evaluation_set.images,
                     evaluation_set.protocol)
            if predictions.reconstruction is None:
                LOG.info("%s has landmarks only: no 3D reconstruction NME", inputs.predictor.model.name)
        if inputs.aflw is not None:
            LOG.info("AFLW: %d faces in %s", len(inputs.aflw.names), args.aflw)
            reports["aflw"] = score_aflw(inputs.predictor, inputs.aflw, args.batch_size,
                                         progress_logger(LOG, "AFLW"))
            figures["aflw"] = reports["aflw"]
            figures["aflw_normaliser"] = inputs.aflw.normaliser
    except DatasetError as err:
        LOG.error("%s", err)
        return 1
    seconds = time.perf_counter() - started
    images = len(inputs.refs) + (len(inputs.aflw.names) if inputs.aflw is not None else 0)
    figures.update(images=images, seconds=round(seconds, 3))
    LOG.info("%d faces in %.1f s (%.1f faces/s)", images, seconds, images / max(seconds, 1e-9))
    out_dir = args.out or (args.json.parent if args.json is not None else None)
    if out_dir is not None:
        figures["pictures"] = write_pictures(inputs, predictions, reports, out_dir)
    else:
        LOG.info("no --out or --json: pictures not drawn")
    write_json(args.json, figures)
    print("\n\n".join(format_table(key, report) for key, report in reports.items()))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

