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

AFLW2000-3D (``--aflw2000``): the real folder (imageNNNNN.jpg + .mat) or ``frnet synth --layout
aflw2000-3d``. Each face is cropped by the benchmark rule from its ``pt3d_68``
(:func:`preprocessing.geometry.landmark_crop_box`); the 68 predicted landmarks are compared with
``pt3d_68`` (``aflw2000``) and the 21 AFLW points with the .mat's ``pt2d`` (``aflw21``); a dense
morphable model adds the 3D reconstruction NME (``reconstruction_3d``); faces are binned by the
yaw of the .mat's ``Pose_Para``. ``--protocol`` names a folder of 3DDFA's arrays: then also the
reannotated landmarks (``aflw2000_reannotated``), the 21 points of ``AFLW2000-3D.pts21.npy``, and
``--yaw-file original|new`` for the bins. The arrays are indexed in the dataset's sorted-file
order, so they are used only on the whole set they describe (2000 faces), checked file by file.

AFLW (``--aflw DIR``, 21,080 faces) in 3DDFA's test layout: ``DIR/AFLW_GT_crop/`` (the faces
already cropped by their ROI boxes, 120x120), ``DIR/AFLW_GT_crop.list`` (their names, in array
order) and, in ``--aflw-protocol`` (default DIR), ``AFLW_GT_pts21.npy``,
``AFLW_GT_crop_roi_box.npy``, ``AFLW_GT_crop_yaws.npy`` and optionally ``AFLW_GT_pts68.npy``, the
68-point landmarks whose bbox normalises in the papers (without it: the visible 21 points' bbox).

Output: the figures as JSON (fractions; layout in :func:`models.evaluation.aflw2000_report`),
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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
import pyarrow.fs as pafs

from models.checkpoint import ModelBundle, load_bundle
from models.evaluation import (
    MISSING_POINT,
    YAW_BIN_LABELS,
    aflw2000_report,
    nme_21,
    reconstruction_nme,
)
from models.face_models import load_face_model
from models.params import ParamStats
from models.predictor import FacePredictor, MeanFacePredictor
from models.registry import ARCHITECTURES, load_model
from pipeline.common import progress_logger, setup_logging, write_json
from pipeline.tracking import bundle_from_model_uri
from preprocessing.annotations import decode_image
from preprocessing.datasets import SampleRef, list_aflw2000, read_annotation, read_image
from preprocessing.errors import DatasetError, MissingFileError
from preprocessing.geometry import (
    CROP_SIZE,
    crop_image,
    crop_to_image,
    image_to_crop,
    landmark_crop_box,
    nme,
    param_frame_to_crop,
)
from preprocessing.labels import canonical_angles, label_from_annotation
from preprocessing.overlay import draw_landmarks, tile

LOG = logging.getLogger("frnet.evaluate")

AFLW2000_ARRAYS = {
    "pts68": "AFLW2000-3D.pts68.npy",
    "reannotated": "AFLW2000-3D-Reannotated.pts68.npy",
    "yaw_original": "AFLW2000-3D.pose.npy",
    "yaw_new": "AFLW2000-3D-new.pose.npy",
    "pts21": "AFLW2000-3D.pts21.npy",
}
AFLW_CROPS = "AFLW_GT_crop"
AFLW_LIST = "AFLW_GT_crop.list"
AFLW_ARRAYS = {"pts21": "AFLW_GT_pts21.npy", "roi_box": "AFLW_GT_crop_roi_box.npy",
               "yaw": "AFLW_GT_crop_yaws.npy"}
AFLW_PTS68 = "AFLW_GT_pts68.npy"
# On the real set the .mat's pt3d_68 and the protocol's pts68 agree to 3e-5 px (float32 copies);
# a larger difference means the folder is not the one the arrays describe.
PROTOCOL_MATCH_TOLERANCE_PX = 0.01
OVERLAY_PER_ROW = 3
OVERLAY_UPSCALE = 3
PREDICTED_BGR = (0, 200, 0)
TRUTH_BGR = (0, 0, 255)
REPORT_TITLES = {
    "aflw2000": "AFLW2000-3D, 68 points, original annotation",
    "aflw2000_reannotated": "AFLW2000-3D, 68 points, reannotated",
    "aflw21": "AFLW2000-3D, 21 points",
    "reconstruction_3d": "AFLW2000-3D, 3D reconstruction",
    "aflw": "AFLW, 21 points",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="frnet evaluate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path,
                        help="the project's model file, or with --arch a network checkpoint")
    source.add_argument("--model-uri", help="a registered model, e.g. models:/mobile-frnet@champion")
    parser.add_argument("--tracking-uri", help="with --model-uri: the MLflow store "
                                               "(default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--arch", choices=list(ARCHITECTURES),
                        help="read --checkpoint as bare weights of this network")
    parser.add_argument("--width", type=float, default=1.0, help="with --arch: width multiplier")
    parser.add_argument("--morphable", help="with --arch: morphable model source (bfm68:FOLDER, ...)")
    parser.add_argument("--param-stats", help="with --arch: MEAN_FILE,STD_FILE whitening statistics")
    parser.add_argument("--aflw2000", type=Path, help="AFLW2000-3D folder (imageNNNNN.jpg + .mat)")
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
    parser.add_argument("--json", type=Path, help="write the figures here")
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
    extras = [flag for flag, value in (("--morphable", args.morphable), ("--param-stats", args.param_stats))
              if value is not None]
    if args.arch is None and extras:
        raise ValueError(f"{' and '.join(extras)} only go with --arch (a model file carries its own)")
    if args.arch is not None and len(extras) < 2:
        raise ValueError("--arch needs --morphable SOURCE and --param-stats MEAN_FILE,STD_FILE")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")


# -- the model ------------------------------------------------------------------------------------

def parse_param_stats(spec: str) -> ParamStats:
    """``MEAN_FILE,STD_FILE`` -> the whitening statistics in those two text files."""
    parts = spec.split(",")
    if len(parts) != 2 or not all(part.strip() for part in parts):
        raise ValueError(f"--param-stats {spec!r}: expected MEAN_FILE,STD_FILE (two paths, one comma)")
    return ParamStats.from_text_files(Path(parts[0].strip()), Path(parts[1].strip()))


def read_model_file(path: Path) -> ModelBundle:
    """The project's model file at ``path``; a ValueError says why a file is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        bundle, _ = load_bundle(path)
    except ValueError as err:
        raise ValueError(f"{err}; for a bare network checkpoint give --arch, --morphable and "
                         "--param-stats") from err
    return bundle


def load_predictor(args: argparse.Namespace) -> tuple[FacePredictor, dict[str, Any]]:
    """The predictor the arguments describe and a description of it for the JSON."""
    if args.model_uri is not None:
        if args.arch is not None:
            raise ValueError("--arch reads a bare checkpoint; a --model-uri carries its own")
        bundle = bundle_from_model_uri(args.model_uri, args.tracking_uri)
        predictor = bundle.predictor(args.device)
        return predictor, {"checkpoint": args.model_uri, "arch": bundle.arch, "width": bundle.width,
                           "morphable_model": predictor.model.identity,
                           "param_stats": predictor.stats.identity}
    if args.arch is None:
        bundle = read_model_file(args.checkpoint)
        try:
            predictor = bundle.predictor(args.device)
        except RuntimeError as err:  # load_state_dict(strict=True) on weights of another network
            raise ValueError(f"{args.checkpoint}: its weights do not fit {bundle.arch} "
                             f"(width {bundle.width}): {err}") from err
        arch, width = bundle.arch, bundle.width
    else:
        stats = parse_param_stats(args.param_stats)
        face_model = load_face_model(args.morphable)
        if not args.checkpoint.is_file():
            raise ValueError(f"{args.checkpoint}: no such file")
        network = load_model(args.arch, args.width, args.checkpoint)  # ValueError names the file
        predictor = FacePredictor(network, stats, face_model, args.device)
        arch, width = args.arch, args.width
    return predictor, {
        "checkpoint": str(args.checkpoint), "arch": arch, "width": width,
        "morphable_model": predictor.model.identity, "param_stats": predictor.stats.identity,
    }


def vertices_in_image(predictor: FacePredictor, params: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Every model vertex (3, N) of a parameter (62,) of the crop ``box``, in image pixels."""
    return crop_to_image(param_frame_to_crop(predictor.model.vertices(params)), box)


# -- AFLW2000-3D ----------------------------------------------------------------------------------

def _load_array(path: Path, tail: tuple[int | None, ...]) -> np.ndarray:
    """A protocol array of shape (M, *tail) as float64, read without pickle; None in ``tail``
    matches any length."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err})") from err
    fits = array.ndim == 1 + len(tail) and all(
        want in (None, got) for want, got in zip(tail, array.shape[1:], strict=True))
    if not fits:
        expected = ", ".join("K" if length is None else str(length) for length in tail)
        raise ValueError(f"{path}: expected shape (M, {expected}), got {array.shape}")
    return array.astype(np.float64)


@dataclass(frozen=True)
class Aflw2000Protocol:
    """3DDFA's AFLW2000-3D arrays; row i belongs to the i-th file in sorted order.

    Attributes: pts68 (M, 3, 68) and reannotated (M, 2, 68) landmarks in image pixels; yaw_original
    and yaw_new (M,) in degrees; pts21 (M, 2, 21), -1 where invisible.
    """

    folder: Path
    pts68: np.ndarray
    reannotated: np.ndarray
    yaw_original: np.ndarray
    yaw_new: np.ndarray
    pts21: np.ndarray

    @classmethod
    def load(cls, folder: Path) -> Aflw2000Protocol:
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"{folder}: no such folder (--protocol)")
        tails = {"pts68": (3, 68), "reannotated": (2, 68), "yaw_original": (), "yaw_new": (),
                 "pts21": (2, 21)}
        arrays = {key: _load_array(folder / AFLW2000_ARRAYS[key], tail) for key, tail in tails.items()}
        rows = {len(array) for array in arrays.values()}
        if len(rows) != 1:
            raise ValueError(f"{folder}: the arrays disagree on the number of faces ({sorted(rows)})")
        return cls(folder=folder, **arrays)

    def __len__(self) -> int:
        return len(self.pts68)


@dataclass(frozen=True)
class Aflw2000Predictions:
    """What the model gave on an AFLW2000-3D folder, with the .mat ground truth beside it.

    Attributes: stems (N,); boxes (N, 4) crop boxes; predicted and truth (N, 3, 68) landmarks in
    image pixels; yaw_mat (N,) degrees; pt2d the .mat's 21 points (2, 21) per face or None;
    reconstruction (N,) 3D NME or None for a landmark-only model.
    """

    stems: list[str]
    boxes: np.ndarray
    predicted: np.ndarray
    truth: np.ndarray
    yaw_mat: np.ndarray
    pt2d: list[np.ndarray | None]
    reconstruction: np.ndarray | None


def predict_aflw2000(
    predictor: FacePredictor, filesystem: pafs.FileSystem, refs: list[SampleRef], batch_size: int,
    progress: Callable[[int, int], None], protocol: Aflw2000Protocol | None = None,
) -> Aflw2000Predictions:
    """Crop every face by the benchmark rule, predict in batches, map back to the image.

    With ``protocol`` every file's pt3d_68 is checked against its row first (see
    :func:`check_protocol_row`), so that a wrong folder stops before the work.
    """
    dense = predictor.model.is_dense
    stems, boxes, predicted, truth, yaws, pt2d, reconstruction = [], [], [], [], [], [], []
    for start in range(0, len(refs), batch_size):
        batch = refs[start:start + batch_size]
        annotations = [read_annotation(filesystem, ref) for ref in batch]
        if protocol is not None:
            for row, annotation in enumerate(annotations, start=start):
                check_protocol_row(protocol, row, annotation.pt3d_68, batch[row - start].stem)
        images = [read_image(filesystem, ref) for ref in batch]
        batch_boxes = [landmark_crop_box(annotation.pt3d_68) for annotation in annotations]
        crops = np.stack([crop_image(image, box) for image, box in zip(images, batch_boxes, strict=True)])
        params = predictor.predict_params(crops)  # (B, 62)
        for ref, annotation, image, box, param in zip(batch, annotations, images, batch_boxes, params,
                                                      strict=True):
            vertices = vertices_in_image(predictor, param, box)
            stems.append(ref.stem)
            boxes.append(box)
            predicted.append(vertices[:, predictor.model.landmark_indices])
            truth.append(annotation.pt3d_68)
            yaws.append(np.rad2deg(canonical_angles(annotation.pose_para)[1]))
            has_21 = annotation.pt2d is not None and annotation.pt2d.shape == (2, 21)
            pt2d.append(annotation.pt2d if has_21 else None)
            if dense:
                # The ground-truth mesh through the same label and decoder as the prediction: the
                # label reproduces the .mat's image-space geometry exactly (preprocessing.labels).
                label = label_from_annotation(annotation, box, image.shape[0])
                reconstruction.append(reconstruction_nme(
                    vertices, vertices_in_image(predictor, label, box), annotation.pt3d_68))
        progress(start + len(batch), len(refs))
    return Aflw2000Predictions(
        stems=stems, boxes=np.array(boxes), predicted=np.array(predicted), truth=np.array(truth),
        yaw_mat=np.array(yaws), pt2d=pt2d, reconstruction=np.array(reconstruction) if dense else None,
    )


def check_protocol_row(protocol: Aflw2000Protocol, row: int, pt3d_68: np.ndarray, stem: str) -> None:
    """The file at sorted position ``row`` must carry the protocol's landmarks of that row."""
    difference = float(np.abs(pt3d_68 - protocol.pts68[row]).max())
    if difference > PROTOCOL_MATCH_TOLERANCE_PX:
        raise DatasetError(
            f"{stem}.mat",
            f"pt3d_68 differs from row {row} of {protocol.folder / AFLW2000_ARRAYS['pts68']} by "
            f"{difference:.3g} px: not the AFLW2000-3D set the arrays describe",
        )


def aflw2000_reports(
    predictions: Aflw2000Predictions, protocol: Aflw2000Protocol | None, yaw_file: str | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The AFLW2000-3D reports and what each one compared against."""
    stems = predictions.stems
    sources = {"aflw2000": "original: pt3d_68 of the .mat files"}
    yaw, sources["yaw"] = predictions.yaw_mat, "the .mat files' Pose_Para (canonical angles)"
    if protocol is not None and yaw_file is not None:
        key = f"yaw_{yaw_file}"
        yaw, sources["yaw"] = getattr(protocol, key), str(protocol.folder / AFLW2000_ARRAYS[key])
    reports = {"aflw2000": aflw2000_report(nme(predictions.predicted, predictions.truth), yaw, stems)}
    if protocol is not None:
        reports["aflw2000_reannotated"] = aflw2000_report(
            nme(predictions.predicted, protocol.reannotated), yaw, stems)
        sources["aflw2000_reannotated"] = str(protocol.folder / AFLW2000_ARRAYS["reannotated"])
        points_21 = list(protocol.pts21)
        sources["aflw21"] = str(protocol.folder / AFLW2000_ARRAYS["pts21"])
    else:
        points_21 = predictions.pt2d
        sources["aflw21"] = "pt2d of the .mat files"
    usable = [i for i, points in enumerate(points_21) if points is not None
              and np.any((points[0] != MISSING_POINT) & (points[1] != MISSING_POINT))]
    if usable:
        errors_21 = [nme_21(predictions.predicted[i], points_21[i], predictions.truth[i]) for i in usable]
        reports["aflw21"] = aflw2000_report(np.array(errors_21), yaw[usable], [stems[i] for i in usable])
        sources["aflw21"] += f" ({len(usable)} of {len(stems)} faces with visible points)"
    else:
        del sources["aflw21"]
        LOG.info("no 21-point annotation in the .mat files: aflw21 left out")
    if predictions.reconstruction is not None:
        reports["reconstruction_3d"] = aflw2000_report(predictions.reconstruction, yaw, stems)
        sources["reconstruction_3d"] = ".mat Shape_Para[:40], Exp_Para[:10], Pose_Para through the model"
    return reports, sources


# -- AFLW -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AflwSet:
    """AFLW in 3DDFA's test layout: crop names in array order and the protocol arrays.

    Attributes: names (M,) relative to ``crop_folder``; pts21 (M, 2, 21) image pixels, -1 where
    invisible; roi_box (M, 4) the crop boxes; yaw (M,) degrees; pts68 (M, 2+, 68) or None.
    """

    crop_folder: Path
    names: list[str]
    pts21: np.ndarray
    roi_box: np.ndarray
    yaw: np.ndarray
    pts68: np.ndarray | None
    normaliser: str

    @classmethod
    def open(cls, folder: Path, protocol_folder: Path | None) -> AflwSet:
        folder = Path(folder)
        protocol_folder = Path(protocol_folder) if protocol_folder is not None else folder
        for path in (folder / AFLW_CROPS, protocol_folder):
            if not path.is_dir():
                raise ValueError(f"{path}: no such folder (AFLW in 3DDFA's test layout)")
        list_path = folder / AFLW_LIST
        if not list_path.is_file():
            raise ValueError(f"{list_path}: no such file (the crop names, one a line)")
        names = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
        pts21 = _load_array(protocol_folder / AFLW_ARRAYS["pts21"], (2, 21))
        roi_box = _load_array(protocol_folder / AFLW_ARRAYS["roi_box"], (4,))
        yaw = _load_array(protocol_folder / AFLW_ARRAYS["yaw"], ())
        pts68_path = protocol_folder / AFLW_PTS68
        pts68 = _load_array(pts68_path, (None, 68))[:, :2] if pts68_path.is_file() else None
        sizes = {len(names), len(pts21), len(roi_box), len(yaw)}
        sizes |= {len(pts68)} if pts68 is not None else set()
        if len(sizes) != 1:
            raise ValueError(f"{list_path} lists {len(names)} crops but the arrays in {protocol_folder} "
                             f"hold {len(pts21)} / {len(roi_box)} / {len(yaw)} rows")
        if len(set(names)) != len(names):
            raise ValueError(f"{list_path}: a crop is listed twice")
        visible = (pts21[:, 0] != MISSING_POINT) & (pts21[:, 1] != MISSING_POINT)  # (M, 21)
        blind = np.flatnonzero(~visible.any(axis=1))
        if blind.size:
            raise ValueError(f"{protocol_folder / AFLW_ARRAYS['pts21']}: row {blind[0]} has no visible point")
        normaliser = (f"bbox of {pts68_path}" if pts68 is not None else
                      f"bbox of the visible 21 points ({AFLW_PTS68} not in {protocol_folder}; the papers "
                      "use the 68-point bbox, so figures are not comparable with theirs)")
        return cls(folder / AFLW_CROPS, names, pts21, roi_box, yaw, pts68, normaliser)


def read_crop(path: Path) -> np.ndarray:
    """A 3DDFA test crop as (120, 120, 3) BGR uint8 (resized if stored at another size)."""
    if not path.is_file():
        raise MissingFileError(str(path), "file does not exist")
    image = decode_image(path.read_bytes(), str(path))
    if image.shape[:2] != (CROP_SIZE, CROP_SIZE):
        # The crop spans the ROI box whatever its pixel size, so resizing keeps the mapping.
        image = cv2.resize(image, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LINEAR)
    return image


def evaluate_aflw(predictor: FacePredictor, aflw: AflwSet, batch_size: int,
                  progress: Callable[[int, int], None]) -> dict[str, Any]:
    """The AFLW report: predicted landmarks mapped through each ROI box, 21-point NME by yaw bin."""
    errors = []
    for start in range(0, len(aflw.names), batch_size):
        names = aflw.names[start:start + batch_size]
        params = predictor.predict_params(np.stack([read_crop(aflw.crop_folder / name) for name in names]))
        for offset, param in enumerate(params):
            i = start + offset
            vertices = vertices_in_image(predictor, param, aflw.roi_box[i])
            landmarks = vertices[:, predictor.model.landmark_indices]
            errors.append(nme_21(landmarks, aflw.pts21[i], None if aflw.pts68 is None else aflw.pts68[i]))
        progress(start + len(names), len(aflw.names))
    stems = [str(PurePosixPath(name).with_suffix("")) for name in aflw.names]
    return aflw2000_report(np.array(errors), aflw.yaw, stems)


# -- pictures and the table -----------------------------------------------------------------------

def plot_cumulative_errors(reports: dict[str, dict[str, Any]], path: Path) -> None:
    """Cumulative error distribution: fraction of images (y) with NME at most x %, one curve a report."""
    from matplotlib.figure import Figure  # only when pictures are drawn

    figure = Figure(figsize=(6.4, 4.4), dpi=120)
    axes = figure.subplots()
    upper = 1.0
    for key, report in reports.items():
        errors = np.sort(np.array(list(report["per_image"].values()))) * 100.0
        fraction = np.arange(1, len(errors) + 1) / len(errors)
        axes.step(np.concatenate([[0.0], errors]), np.concatenate([[0.0], fraction]), where="post",
                  label=f"{REPORT_TITLES[key]} (mean {report['nme_per_sample_mean'] * 100:.2f} %)")
        upper = max(upper, float(np.percentile(errors, 99)) * 1.1)
    axes.set(xlim=(0.0, upper), ylim=(0.0, 1.0), xlabel="NME (%)", ylabel="fraction of images",
             title="Cumulative error distribution")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def plot_yaw_bins(reports: dict[str, dict[str, Any]], path: Path) -> None:
    """One bar chart per report: mean NME % of each |yaw| bin, its image count on the bar."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.2 * len(reports), 3.6), dpi=120)
    for axes, (key, report) in zip(np.atleast_1d(figure.subplots(1, len(reports))), reports.items(),
                                   strict=True):
        means = [row["mean"] * 100.0 if row["mean"] is not None else 0.0 for row in report["bins"]]
        bars = axes.bar(YAW_BIN_LABELS, means, color=["#4c72b0", "#dd8452", "#c44e52"])
        for bar, row in zip(bars, report["bins"], strict=True):
            axes.annotate(f"n={row['count']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)
        axes.set(xlabel="|yaw| (degrees)", ylabel="NME (%)",
                 title=f"{REPORT_TITLES[key]}\nmean {report['nme_mean_of_bins'] * 100:.2f}, "
                       f"std {report['nme_std_of_bins'] * 100:.2f}")
        axes.title.set_fontsize(8)
        axes.margins(y=0.15)
    figure.tight_layout()
    figure.savefig(path)


def overlay_sheet(
    predictor_name: str, filesystem: pafs.FileSystem, refs: list[SampleRef],
    predictions: Aflw2000Predictions, errors: np.ndarray, path: Path,
) -> None:
    """Crops of the best, median and worst faces (one row each), ground truth red, prediction green."""
    order = np.argsort(errors, kind="stable")
    count = min(OVERLAY_PER_ROW, len(order))
    middle = max(0, min(len(order) // 2 - count // 2, len(order) - count))
    rows = (("best", order[:count]), ("median", order[middle:middle + count]), ("worst", order[-count:]))
    tiles = []
    for label, indices in rows:
        for i in indices:
            box = predictions.boxes[i]
            crop = crop_image(read_image(filesystem, refs[i]), box)
            canvas = draw_landmarks(crop, image_to_crop(predictions.truth[i][:2], box), TRUTH_BGR,
                                    OVERLAY_UPSCALE)
            # draw_landmarks enlarges what it is given; the prediction goes onto the enlarged canvas,
            # so its 1-based crop coordinates are moved to the canvas' (centre x -> k (x - 0.5) + 0.5).
            predicted = (image_to_crop(predictions.predicted[i][:2], box) - 0.5) * OVERLAY_UPSCALE + 0.5
            canvas = draw_landmarks(canvas, predicted, PREDICTED_BGR, upscale=1)
            cv2.putText(canvas, f"{label} {predictions.stems[i]} {errors[i] * 100:.2f}%", (4, 14),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(canvas)
    sheet = tile(tiles, columns=count)
    cv2.putText(sheet, predictor_name, (4, sheet.shape[0] - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.3,
                (90, 90, 90), 1, cv2.LINE_AA)
    if not cv2.imwrite(str(path), sheet):
        raise OSError(f"{path}: could not write the overlay sheet")


def format_table(key: str, report: dict[str, Any]) -> str:
    """The NME table of one report, in %."""
    lines = [REPORT_TITLES[key], f"  {'|yaw|':<10}{'images':>8}{'NME %':>9}"]
    for row in report["bins"]:
        mean = f"{row['mean'] * 100:9.3f}" if row["mean"] is not None else f"{'-':>9}"
        lines.append(f"  {row['range']:<10}{row['count']:>8}{mean}")
    lines.append(f"  {'mean':<18}{report['nme_mean_of_bins'] * 100:9.3f}   (of the bin means)")
    lines.append(f"  {'std':<18}{report['nme_std_of_bins'] * 100:9.3f}")
    overall = report["nme_per_sample_mean"] * 100
    lines.append(f"  {'all images':<10}{len(report['per_image']):>8}{overall:9.3f}")
    return "\n".join(lines)


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
        if not args.aflw2000.is_dir():
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


def write_pictures(inputs: Inputs, predictions: Aflw2000Predictions | None,
                   reports: dict[str, dict[str, Any]], out_dir: Path) -> dict[str, str]:
    """The three pictures into ``out_dir``; returns their paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"cumulative_errors": out_dir / "cumulative_errors.png", "yaw_bins": out_dir / "nme_by_yaw.png"}
    plot_cumulative_errors(reports, paths["cumulative_errors"])
    plot_yaw_bins(reports, paths["yaw_bins"])
    if predictions is not None:
        paths["overlays"] = out_dir / "landmark_overlays.png"
        errors = np.array(list(reports["aflw2000"]["per_image"].values()))
        overlay_sheet(inputs.model_info["checkpoint"], inputs.filesystem, inputs.refs, predictions, errors,
                      paths["overlays"])
    else:
        LOG.info("no AFLW2000-3D faces: the overlay sheet is left out (AFLW's 21 points have no outline)")
    return {name: str(path) for name, path in paths.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
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
            if predictions.reconstruction is None:
                LOG.info("%s has landmarks only: no 3D reconstruction NME", inputs.predictor.model.name)
        if inputs.aflw is not None:
            LOG.info("AFLW: %d faces in %s", len(inputs.aflw.names), args.aflw)
            reports["aflw"] = evaluate_aflw(inputs.predictor, inputs.aflw, args.batch_size,
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
    sys.exit(main())
