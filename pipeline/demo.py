"""The whole pipeline on the embedded default: synthetic data, a local Ray, a local MLflow store.

    make demo            # or: frnet demo --out runs/demo [--no-tune]

Renders a synthetic 300W-LP training folder and a synthetic AFLW2000-3D test folder (the real
layouts; the label round trip is checked) and preprocesses them with Ray Data into shards. A short
Ray Tune sweep (two-epoch trials, ASHA) then picks the loss weights, and Ray Train trains the best
trial's config for the full budget (two workers); that model is evaluated on the test folder and
registered. The champion is evaluated next to the mean-face baseline, pulled back from the MLflow
registry by alias, and shown on the most frontal test images through the face detector, each
prediction over its ground truth (``showcase/showcase.png``). Every stage is the one users run
(``frnet STAGE``), called with the demo's configs (``configs/demo/``); everything goes under ``--out``.

Exit status 1 when a stage fails, a showcase prediction is flagged or finds no face, or the
champion does not beat the mean face by ``--min-improvement``; 2 when it cannot start as given.

The figures are on synthetic faces: they show the pipeline works and learns, not how the model
does on real photographs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.checkpoint import ModelBundle
from models.frame import nme
from models.synthetic_face import build_synthetic_head
from pipeline import evaluate, preprocess, train, tune
from pipeline.evaluation.scoring import EvaluationSet
from pipeline.predict import predict_images, read_image
from pipeline.runtime.config import ConfigError, load_config
from pipeline.runtime.console import is_verbose, run_main
from pipeline.runtime.ray_session import RayStartError, start_ray
from pipeline.runtime.stage_tools import progress_logger, setup_logging, stage_parser, write_json
from pipeline.runtime.tracking import bundle_from_model_uri, tracking_uri
from pipeline.training.config import TrainConfig
from preprocessing.datasets import list_aflw2000, read_annotation
from preprocessing.labels import canonical_angles
from preprocessing.overlay import (
    BOX_BGR,
    FLAGGED_BGR,
    LANDMARK_BGR,
    TRUTH_BGR,
    caption,
    draw_box,
    draw_landmarks,
    enlarge,
    legend,
    tile,
)
from preprocessing.synth import SynthConfig, generate
from preprocessing.verify import label_round_trip

LOG = logging.getLogger("frnet.demo")
REPO = Path(__file__).resolve().parents[1]
# A round trip through float32 .mat fields and back must stay this close (pixels).
ROUND_TRIP_TOLERANCE_PX = 1e-4
PREDICTED_IMAGES = 4
SHOWCASE_COLUMNS = 2
# The synthetic-crop sheet enlarges each crop so that the landmarks can be told apart.
SHEET_SCALE = 3


class StageFailed(RuntimeError):
    """A stage returned a non-zero exit code; its own log says why."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("frnet demo", __doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier demo in --out first")
    parser.add_argument("--train-images", type=int, default=800,
                        help="synthetic 300W-LP images (unflipped; the _Flip folders double it)")
    parser.add_argument("--views", type=int, default=4, help="300W-LP profile views per synthetic face")
    parser.add_argument("--test-images", type=int, default=300, help="synthetic AFLW2000-3D images")
    parser.add_argument("--epochs", type=int, help="override the demo training config's epochs")
    parser.add_argument("--no-tune", action="store_true",
                        help="skip the Ray Tune sweep and train the demo's own config")
    parser.add_argument("--tune-epochs", type=int, help="override the sweep's epochs per trial")
    parser.add_argument("--configs", type=Path, default=REPO / "configs" / "demo",
                        help="folder with the demo's preprocess.yaml, train.yaml and tune.yaml")
    parser.add_argument("--space", type=Path, default=REPO / "tune_spaces" / "small.yaml")
    parser.add_argument("--min-improvement", type=float, default=3.0,
                        help="fail unless the mean-face NME is at least this many times the model's "
                             "(0: report only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="rendering processes")
    return parser.parse_args(argv)


def run_stage(name: str, stage: Callable[[list[str]], int], arguments: list[str], log: list[dict]) -> None:
    """Run one ``frnet STAGE`` in this process; a non-zero exit stops the demo."""
    arguments = [*arguments, "--verbose"] if is_verbose() else arguments
    LOG.info("== %s: frnet %s %s", name, stage.__module__.rsplit(".", 1)[-1], " ".join(arguments))
    started = time.perf_counter()
    code = stage(arguments)
    seconds = time.perf_counter() - started
    log.append({"stage": name, "seconds": round(seconds, 1), "exit": code})
    LOG.info("== %s finished in %.0f s", name, seconds)
    if code != 0:
        raise StageFailed(f"{name} failed (exit {code}); see the lines above")


def render_data(args: argparse.Namespace, data_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Synthetic training and test folders in the real layouts, their label round trip checked,
    and a sheet of labelled crops."""
    figures: dict[str, Any] = {}
    datasets = {
        "300w-lp": (SynthConfig("300w-lp", args.train_images, seed=args.seed, views_per_face=args.views),
                    data_dir / "300W_LP"),
        "aflw2000-3d": (SynthConfig("aflw2000-3d", args.test_images, seed=args.seed + 1),
                        data_dir / "AFLW2000"),
    }
    model = build_synthetic_head().model
    crops: list = []
    for layout, (config, folder) in datasets.items():
        LOG.info("[%s] rendering into %s", layout, folder)
        figures[f"synth_{layout}"] = generate(config, folder, workers=args.workers,
                                              progress=progress_logger(LOG, f"[{layout}] rendered"))
        report = label_round_trip(model, layout, str(folder), crops=crops, max_crops=len(crops) + 8)
        figures[f"round_trip_{layout}"] = report.as_dict()
        LOG.info("[%s] %d of %d samples labelled; landmark round trip max error %.2e px",
                 layout, report.checked, report.inputs, report.max_error_px)
        if report.failed or report.max_error_px > ROUND_TRIP_TOLERANCE_PX:
            raise StageFailed(f"[{layout}] label round trip failed: {report.failed or report.max_error_px}")
    sheet_path = run_dir / "synthetic_crops.png"
    cv2.imwrite(str(sheet_path), tile([draw_landmarks(enlarge(image, SHEET_SCALE), points, scale=SHEET_SCALE)
                                          for image, points in crops], columns=8))
    figures["synthetic_crops"] = str(sheet_path)
    return figures


def frontal_stems(folder: Path, count: int) -> list[str]:
    """The ``count`` test images closest to frontal (by their annotated yaw)."""
    filesystem, refs = list_aflw2000(folder)
    yaws = [(abs(canonical_angles(read_annotation(filesystem, ref).pose_para)[1]), ref.stem) for ref in refs]
    return [stem for _, stem in sorted(yaws)[:count]]


def showcase(bundle: ModelBundle, folder: Path, stems: list[str], out: Path) -> dict[str, Any]:
    """Predict AFLW2000-3D-layout images as ``frnet predict`` does (the face detector, the fit
    checks; its files under ``out``) and draw each prediction over its ground truth on one sheet,
    ``out/showcase.png``. ``failures`` lists every flagged prediction and image without a face."""
    images = [folder / f"{stem}.jpg" for stem in stems]
    records = predict_images(bundle, images, out).faces
    filesystem, refs = list_aflw2000(folder)
    truths = {ref.stem: read_annotation(filesystem, ref).pt3d_68 for ref in refs if ref.stem in stems}
    predicted = {Path(record["image"]).stem: record for record in records}
    panels, failures, faces = [], [], []
    for stem, path in zip(stems, images, strict=True):
        canvas = draw_landmarks(read_image(path), truths[stem][:2], TRUTH_BGR)
        record = predicted.get(stem)
        if record is None:
            failures.append(f"{stem}: no face found by the face detector")
            panels.append(caption(canvas, [failures[-1]], FLAGGED_BGR))
            continue
        landmarks = np.array(record["landmarks"]).T
        error = float(nme(landmarks, truths[stem]))
        faces.append({"stem": stem, "nme": error, "flagged": record["flagged"], "flags": record["flags"],
                      "detector_score": record["detector_score"]})
        canvas = draw_landmarks(draw_box(canvas, np.array(record["box"])), landmarks[:2], LANDMARK_BGR)
        lines = [f"{stem}: NME {100 * error:.2f}%, yaw {record['pose_degrees']['yaw']:.0f} deg, "
                 f"detector score {record['detector_score']:.2f}"]
        if record["flagged"]:
            failures.append(f"{stem}: flagged: {'; '.join(record['flags'])}")
            lines.append("FLAGGED: " + "; ".join(record["flags"]))
        panels.append(caption(canvas, lines, FLAGGED_BGR if record["flagged"] else (0, 0, 0)))
    height = max(panel.shape[0] for panel in panels)
    panels = [np.pad(panel, ((0, height - panel.shape[0]), (0, 0), (0, 0)), constant_values=255)
              for panel in panels]
    sheet = legend(tile(panels, columns=min(SHOWCASE_COLUMNS, len(panels))),
                   [("ground truth", TRUTH_BGR), ("prediction", LANDMARK_BGR), ("detector box", BOX_BGR),
                    ("flagged (caption)", FLAGGED_BGR)])
    sheet = caption(sheet, [f"The {len(stems)} most frontal synthetic test faces through the face detector "
                            "and the registered model; NME against the ground truth"])
    path = out / "showcase.png"
    cv2.imwrite(str(path), sheet)
    for failure in failures:
        LOG.error("showcase: %s", failure)
    return {"sheet": str(path), "faces": faces, "failures": failures}


def bin_table(champion: dict[str, Any], baseline: dict[str, Any]) -> str:
    """NME (%) by |yaw| bin: the champion and the mean face, side by side."""
    lines = [f"{'|yaw| bin':<12}{'faces':>7}{'champion':>11}{'mean face':>11}"]
    for ours, theirs in zip(champion["bins"], baseline["bins"], strict=True):
        cells = [("-" if row["mean"] is None else f"{100 * row['mean']:.2f}") for row in (ours, theirs)]
        lines.append(f"{ours['range']:<12}{ours['count']:>7}{cells[0]:>11}{cells[1]:>11}")
    lines.append(f"{'mean of bins':<12}{'':>7}{100 * champion['nme_mean_of_bins']:>11.2f}"
                 f"{100 * baseline['nme_mean_of_bins']:>11.2f}")
    lines.append(f"{'per face':<12}{'':>7}{100 * champion['nme_per_sample_mean']:>11.2f}"
                 f"{100 * baseline['nme_per_sample_mean']:>11.2f}")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    data_dir, shards = run_dir / "data", run_dir / "data" / "shards"
    test_dir = data_dir / "AFLW2000"
    tracking = tracking_uri("", run_dir)
    stages: list[dict] = []
    figures: dict[str, Any] = {"run_dir": str(run_dir), "synthetic_data": True, "stages": stages}
    started = time.perf_counter()
    figures["data"] = render_data(args, data_dir, run_dir)
    stages.append({"stage": "synth", "seconds": round(time.perf_counter() - started, 1), "exit": 0})
    start_ray(args.num_cpus, logging_level=logging.WARNING)
    run_stage("preprocess", preprocess.main, [
        "--input", str(data_dir / "300W_LP"), "--output", str(shards), "--aflw2000", str(test_dir),
        "--config", str(args.configs / "preprocess.yaml"), "--json", str(run_dir / "preprocess.json"),
    ], stages)
    train_config = args.configs / "train.yaml"
    if not args.no_tune:
        tune_arguments = ["--config", str(args.configs / "tune.yaml"), "--space", str(args.space),
                          "--shards", str(shards), "--run-dir", str(run_dir),
                          "--json", str(run_dir / "tune.json")]
        if args.tune_epochs is not None:
            tune_arguments += ["--epochs", str(args.tune_epochs)]
        run_stage("tune", tune.main, tune_arguments, stages)
        train_config = Path(json.loads((run_dir / "tune.json").read_text())["best_config"])
    train_arguments = ["--config", str(train_config), "--shards", str(shards),
                       "--run-dir", str(run_dir), "--json", str(run_dir / "train.json")]
    if args.epochs is not None:
        train_arguments += ["--epochs", str(args.epochs)]
    run_stage("train", train.main, train_arguments, stages)
    model_name = load_config(args.configs / "train.yaml", TrainConfig).mlflow.registered_model
    champion_uri = f"models:/{model_name}@champion"
    evaluation = run_dir / "evaluation"
    for name, extra in (("champion", []), ("mean_face", ["--mean-face"])):
        run_stage(f"evaluate ({name.replace('_', ' ')})", evaluate.main, [
            "--model-uri", champion_uri, "--tracking-uri", tracking, "--aflw2000", str(test_dir), *extra,
            "--json", str(evaluation / f"{name}.json"), "--out", str(evaluation / name)], stages)
    started_showcase = time.perf_counter()
    figures["showcase"] = showcase(bundle_from_model_uri(champion_uri, tracking), test_dir,
                                   frontal_stems(test_dir, PREDICTED_IMAGES), run_dir / "showcase")
    stages.append({"stage": "showcase", "seconds": round(time.perf_counter() - started_showcase, 1),
                   "exit": 1 if figures["showcase"]["failures"] else 0})
    trained = json.loads((run_dir / "train.json").read_text())
    evaluated = json.loads((evaluation / "champion.json").read_text())
    figures.update(
        gate={"nme_mean_of_bins": trained["aflw2000"]["nme_mean_of_bins"], "set": trained["evaluation_set"],
              "evaluated_set": evaluated["evaluation_set"]},
        champion=evaluated["aflw2000"],
        mean_face=json.loads((evaluation / "mean_face.json").read_text())["aflw2000"],
        tracking_uri=tracking, seconds=round(time.perf_counter() - started, 1))
    return figures


def print_summary(figures: dict[str, Any], run_dir: Path, min_improvement: float) -> bool:
    """The NME table, the learning check and where to look next; returns whether the check passed."""
    champion, baseline = figures["champion"], figures["mean_face"]
    ratio = baseline["nme_mean_of_bins"] / max(champion["nme_mean_of_bins"], 1e-12)
    passed = min_improvement <= 0 or ratio >= min_improvement
    print("\nSynthetic AFLW2000-3D test set (synthetic faces, not the real benchmark): NME (%) by |yaw| bin")
    print(bin_table(champion, baseline))
    verdict = "" if min_improvement <= 0 else (" (goal: at least "
                                               f"{min_improvement:g}x: {'met' if passed else 'NOT met'})")
    print(f"The champion's NME is {ratio:.1f}x lower than the mean face's{verdict}.")
    gate = figures["gate"]
    stored = EvaluationSet(**gate["set"]).crops.split(":", 1)[-1]
    ours, theirs = gate["evaluated_set"]["digest"][:12], gate["set"]["digest"][:12]
    print(f"(frnet evaluate's figures, on crops cut from the images, set {ours}; the registration gate's "
          f"{100 * gate['nme_mean_of_bins']:.2f}% came from the same faces' crops as the shards store them "
          f"({stored}), set {theirs}: they differ by that re-encoding only.)")
    print(f"\nDemo finished in {figures['seconds'] / 60:.1f} min; everything is under {run_dir}")
    print(f"  MLflow runs and registry:  mlflow ui --backend-store-uri {figures['tracking_uri']}"
          "   (then open http://127.0.0.1:5000)")
    print(f"  evaluation plots:          {run_dir / 'evaluation' / 'champion'}  "
          "(cumulative_errors.png, nme_by_yaw.png, landmark_overlays.png)")
    if (run_dir / "tune").exists():
        print(f"  sweep table and plots:     {next((run_dir / 'tune').iterdir())}")
    print(f"  showcase (prediction over ground truth): {figures['showcase']['sheet']}")
    print(f"  labelled training crops:   {figures['data']['synthetic_crops']}")
    return passed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    run_dir = args.out.resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        if not args.overwrite:
            LOG.error("%s holds an earlier demo: pass --overwrite to replace it, or another --out", run_dir)
            return 2
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        figures = run_demo(args, run_dir)
    except (StageFailed, ConfigError, RayStartError) as err:
        LOG.error("%s", err)
        return 1
    passed = print_summary(figures, run_dir, args.min_improvement)
    figures["learning_check"] = {"min_improvement": args.min_improvement, "passed": passed}
    write_json(run_dir / "demo.json", figures)
    failures = figures["showcase"]["failures"]
    if failures:
        print(f"The showcase has {len(failures)} failed prediction(s): {'; '.join(failures)}")
    return 0 if passed and not failures else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
