"""Landmarks, head pose and a mesh for face images, from a registered model or a model file.

    frnet predict --model-uri models:/mobile-frnet@champion [--tracking-uri URI] IMAGE... \\
        [--box x1,y1,x2,y2 | --all-faces] [--out DIR] [--json PATH]
    frnet predict --checkpoint runs/default/models/mobile-frnet.pt IMAGE... [--box ...]

``--box`` is a face detector's box (x1, y1, x2, y2 in pixels) used for every image. Without it
each image goes through the MTCNN face detector (:mod:`preprocessing.mtcnn_detector`, weights from
the ``mtcnn`` package) and its largest face is predicted, or with ``--all-faces`` every face.
Either box is cropped by 3DDFA_V2's rule. Every fit is checked (:func:`fit_checks`) and flagged
when the detector's score, its five points or the fitted region look wrong. Per face it writes
``STEM.json`` (68 landmarks in image pixels, pitch / yaw / roll, the box and ``box_source``:
``argument`` or ``mtcnn``, the crop box, the checks and ``flagged``),
``STEM_overlay.png`` and, when the morphable model has triangles, ``STEM.obj`` (the dense mesh in
image pixels, y up); with ``--all-faces`` the stem is ``STEM_face{i}``, i = 0 for the largest face.
STEM is the image's file name without its extension; where two images share it, their folders
(as many as tell them apart, then the extension) are put in front, joined by ``_``
(``a/img.jpg`` and ``b/img.jpg`` give ``a_img`` and ``b_img``). An image given twice is
predicted once. No output ever replaces an input: ``--out`` and ``--json`` are checked first.

Exit status: 0; 2 when the command cannot start as given (bad usage or ``--box``, an image or
model file that does not exist or is not a model, a ``--tracking-uri`` with no store there, an
``--out`` that is a file, a ``--json`` that is a folder, or an output that would replace an input:
nothing is written); 1 when an image could not be read or the detector found no face in it (each
logged and listed in ``--json`` under ``failed`` or ``no_face``; the other images still written,
and the summary too).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np

from models.checkpoint import ModelBundle, load_bundle
from models.predictor import FacePredictor, Prediction
from pipeline.runtime.console import run_main
from pipeline.runtime.paths import input_file, local_file
from pipeline.runtime.stage_tools import setup_logging, stage_parser, write_json
from pipeline.runtime.tracking import bundle_from_model_uri
from preprocessing.datasets import read_bytes, resolve
from preprocessing.mtcnn_detector import MtcnnFaceDetector
from preprocessing.overlay import BOX_BGR, FLAGGED_BGR, caption, draw_box, draw_landmarks

LOG = logging.getLogger("frnet.predict")
BOX_ARGUMENT = "argument"
BOX_DETECTOR = "mtcnn"
# A fit is flagged beyond these bounds. Measured with 3DDFA_V2's released MobileNetV1-0.5 on the
# three real photos at hand and 40 synthetic AFLW2000-3D faces (all found): detector scores
# 0.963-1.000, five-point distances 0.020-0.102 box sides, fit face probabilities 0.969-1.000;
# boxes planted on the background: fit face probability below 0.1 wherever they missed the face.
MIN_DETECTOR_SCORE = 0.9
MAX_POINTS_ERROR = 0.15
MIN_FIT_PROBABILITY = 0.8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("frnet predict", __doc__, inputs_rule=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-uri", help="a registered model, e.g. models:/mobile-frnet@champion")
    source.add_argument("--checkpoint", help="the project's model file (a path or an s3:// URI)")
    parser.add_argument("--tracking-uri", help="with --model-uri: the MLflow store "
                        "(default: $MLFLOW_TRACKING_URI; a store that does not exist is refused)")
    parser.add_argument("images", nargs="+", help="image files (paths or s3:// URIs)")
    faces = parser.add_mutually_exclusive_group()
    faces.add_argument("--box", help="face box x1,y1,x2,y2 in pixels (all images); without it "
                       "the MTCNN face detector finds the faces")
    faces.add_argument("--all-faces", action="store_true",
                       help="every face the detector finds, not only the largest")
    parser.add_argument("--out", type=Path, default=Path("predictions"),
                        help="output folder (default: ./predictions)")
    parser.add_argument("--json", type=Path, help="a summary of every face's outputs (default: not written)")
    return parser.parse_args(argv)


def parse_box(text: str) -> np.ndarray:
    try:
        box = np.array([float(v) for v in text.split(",")])
    except ValueError as err:
        raise ValueError(f"--box {text!r}: expected four numbers x1,y1,x2,y2") from err
    if box.shape != (4,) or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"--box {text!r}: expected x1,y1,x2,y2 with x2 > x1 and y2 > y1")
    return box


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """MTCNN's five points from 68 landmarks (2+, 68) -> (5, 2): the image-left and image-right
    eye centres, the nose tip, the image-left and image-right mouth corners."""
    points = np.asarray(landmarks)[:2].T
    return np.array([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])


def fit_checks(detector: MtcnnFaceDetector, image: np.ndarray, prediction: Prediction,
               box: np.ndarray, score: float | None, points: np.ndarray | None) -> dict:
    """How far a prediction can be trusted: the detector's face probability, how far its five
    points lie from the predicted landmarks' (mean, in detector-box sides), and O-Net's face
    probability of the region the predicted landmarks span; a flag for each beyond its bound."""
    landmarks = prediction.landmarks
    region = np.array([landmarks[0].min(), landmarks[1].min(), landmarks[0].max(), landmarks[1].max()])
    checks: dict = {"face_probability_of_fit": float(detector.face_probability(image, region[None])[0]),
                    "detector_score": score, "points_error": None}
    flags = []
    if score is not None and score < MIN_DETECTOR_SCORE:
        flags.append(f"detector score {score:.2f} < {MIN_DETECTOR_SCORE}")
    if points is not None:
        side = (box[2] - box[0] + box[3] - box[1]) / 2.0
        checks["points_error"] = float(np.linalg.norm(five_points(landmarks) - points, axis=1).mean() / side)
        if checks["points_error"] > MAX_POINTS_ERROR:
            flags.append(f"detector's eyes, nose and mouth {checks['points_error']:.2f} box sides from the "
                         f"fit's > {MAX_POINTS_ERROR}")
    if checks["face_probability_of_fit"] < MIN_FIT_PROBABILITY:
        flags.append(f"the fitted landmarks span no face (face probability "
                     f"{checks['face_probability_of_fit']:.2f} < {MIN_FIT_PROBABILITY})")
    checks["flags"] = flags
    return checks


def overlay(image: np.ndarray, prediction: Prediction, flags: list[str]) -> np.ndarray:
    """The image with the 68 landmarks and the crop box drawn, and why it is flagged if it is."""
    canvas = draw_box(draw_landmarks(image, prediction.landmarks), prediction.box,
                      colour=FLAGGED_BGR if flags else BOX_BGR)
    return caption(canvas, ["FLAGGED: " + "; ".join(flags)], FLAGGED_BGR) if flags else canvas


def write_obj(path: Path, vertices: np.ndarray, triangles: np.ndarray) -> None:
    """A Wavefront mesh: image pixels with y flipped up, so viewers show the face upright."""
    lines = [f"v {x:.4f} {-y:.4f} {z:.4f}" for x, y, z in vertices.T]
    # Image y points down, which mirrors the mesh; reversing the order keeps faces outward.
    lines += [f"f {a + 1} {c + 1} {b + 1}" for a, b, c in triangles]
    path.write_text("\n".join(lines) + "\n")


def read_image(location: str | Path) -> np.ndarray:
    """An image file (a path, or an ``s3://`` URI read through pyarrow) as BGR pixels."""
    if "://" in str(location):
        filesystem, path = resolve(str(location))
        data = np.frombuffer(read_bytes(filesystem, path), np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    else:
        image = cv2.imread(str(location), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{location}: not a readable image")
    return image


def predict_face(predictor: FacePredictor, detector: MtcnnFaceDetector, image: np.ndarray,
                 image_path: str, face: int, found: Found, stem_path: Path) -> dict:
    """Predict one face from its detector box and check the fit; write ``stem_path`` + .json,
    _overlay.png, .obj."""
    prediction = predictor.predict(image, detection=found.box)
    checks = fit_checks(detector, image, prediction, found.box, found.score, found.points)
    pitch, yaw, roll = np.rad2deg(prediction.pose)
    record = {
        "image": str(image_path), "face": face, "box": found.box.tolist(), "box_source": found.source,
        "crop_box": prediction.box.tolist(), "landmarks": prediction.landmarks.T.round(3).tolist(),
        "pose_degrees": {"pitch": float(pitch), "yaw": float(yaw), "roll": float(roll)},
        **checks, "flagged": bool(checks["flags"]), "overlay": f"{stem_path}_overlay.png",
    }
    cv2.imwrite(record["overlay"], overlay(image, prediction, checks["flags"]))
    if predictor.model.triangles is not None:
        record["mesh"] = f"{stem_path}.obj"
        write_obj(Path(record["mesh"]), prediction.vertices, predictor.model.triangles)
    Path(f"{stem_path}.json").write_text(json.dumps(record, indent=1) + "\n")
    LOG.info("%s face %d: yaw %.1f, pitch %.1f, roll %.1f degrees", PurePosixPath(image_path).name, face, yaw,
             pitch, roll)
    if checks["flags"]:
        LOG.warning("%s face %d is flagged: %s", image_path, face, "; ".join(checks["flags"]))
    return record


@dataclass(frozen=True)
class Found:
    """A face box to predict from, where it came from, and the detector's score and five points."""

    box: np.ndarray
    source: str
    score: float | None = None
    points: np.ndarray | None = None


def find_faces(detector: MtcnnFaceDetector, image: np.ndarray, box: np.ndarray | None) -> list[Found]:
    """``--box`` as given, else every face the detector finds, largest first."""
    if box is not None:
        return [Found(box, BOX_ARGUMENT)]
    detections = detector.detect(image)
    return [Found(detections.boxes[i], BOX_DETECTOR, float(detections.scores[i]), detections.points[i])
            for i in range(len(detections))]


@dataclass(frozen=True)
class Predictions:
    """What a prediction run found: a record per face (as ``--json`` lists them under ``images``),
    the images in which the detector found no face, the images that could not be read (with the
    reason), and the images given more than once (with the count; each predicted once)."""

    faces: list[dict[str, Any]]
    no_face: list[str]
    failed: list[dict[str, str]] = field(default_factory=list)
    repeated: dict[str, int] = field(default_factory=dict)

    def counts(self, given: int) -> dict[str, int]:
        """Images given = distinct + repeats; distinct = with faces + no face + failed."""
        with_faces = len({record["image"] for record in self.faces})
        distinct = with_faces + len(self.no_face) + len(self.failed)
        repeats = sum(self.repeated.values()) - len(self.repeated)
        if distinct + repeats != given:
            raise RuntimeError(f"{given} images given, but {distinct} predicted, without a face or failed, "
                               f"and {repeats} repeats")
        return {"given": given, "distinct": distinct, "with_faces": with_faces, "no_face": len(self.no_face),
                "failed": len(self.failed), "faces": len(self.faces)}

    def to_json(self, model: str, given: int) -> dict[str, Any]:
        return {"model": model, "images": self.faces, "no_face": self.no_face, "failed": self.failed,
                "repeated": self.repeated, "counts": self.counts(given)}


def same_input(location: str) -> str:
    """One spelling per input file: a local file by its resolved path, a URI as written."""
    return location if "://" in location else str(Path(location).resolve())


def distinct_images(images: list[str]) -> tuple[list[str], dict[str, int]]:
    """The images in the order given, each once, and how often each repeated one was given."""
    keys = [same_input(image) for image in images]
    first = dict(zip(reversed(keys), reversed(images), strict=True))  # each key's first spelling
    given = Counter(keys)
    return [first[key] for key in given], {first[key]: n for key, n in given.items() if n > 1}


def path_parts(location: str) -> tuple[str, ...]:
    """The folders and file name of an input: a URI's scheme and bucket included, a local
    file's resolved path without its root."""
    if "://" in location:
        scheme, _, rest = location.partition("://")
        return (scheme, *PurePosixPath(rest).parts)
    return Path(location).resolve().parts[1:]


def output_stems(images: list[str]) -> dict[str, str]:
    """A distinct output stem per distinct image (see the module's docstring): images whose
    stems clash take one more folder each round, or, when they sit in one folder, the extension."""
    parts = {image: path_parts(image) for image in images}
    depth, extension = dict.fromkeys(images, 0), dict.fromkeys(images, False)

    def stem(image: str) -> str:
        names = parts[image]
        leaf = PurePosixPath(names[-1])
        folders = names[max(len(names) - 1 - depth[image], 0):-1]
        return "_".join([*folders, leaf.name.replace(".", "_") if extension[image] else leaf.stem])

    while True:
        groups = defaultdict(list)
        for image in images:
            groups[stem(image)].append(image)
        clashes = [group for group in groups.values() if len(group) > 1]
        if not clashes:
            return {image: stem(image) for image in images}
        before = (dict(depth), dict(extension))
        for group in clashes:
            one_folder = len({parts[image][:-1] for image in group}) == 1
            for image in group:
                if one_folder:
                    extension[image] = True
                elif depth[image] < len(parts[image]) - 1:
                    depth[image] += 1
        if (depth, extension) == before:  # names that "_" joins alike (a_b/c, a/b_c): numbered
            stems = {image: stem(image) for image in images}
            for group in clashes:
                stems |= {image: f"{stem(image)}_{i}" for i, image in enumerate(group)}
            return stems


OUTPUT_ENDINGS = (".json", "_overlay.png", ".obj")


def check_outputs(out: Path, summary: Path | None, stems: dict[str, str]) -> None:
    """``--out`` and ``--json`` before any work: a folder (or none yet) and a file (or none yet),
    neither replacing an input; a ValueError naming the flag and the reason."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    local = {same_input(image): image for image in stems if "://" not in image}
    if summary is not None:
        if summary.is_dir():
            raise ValueError(f"--json {summary}: is a folder; give the file to write")
        if str(summary.resolve()) in local:
            raise ValueError(f"--json {summary}: is one of the input images; it would be replaced")
        folder = next((parent for parent in summary.resolve().parents if parent.exists()), None)
        if folder is not None and not folder.is_dir():
            raise ValueError(f"--json {summary}: {folder} is a file, not a folder")
    stem_names = "|".join(re.escape(stem) for stem in stems.values())
    endings = "|".join(re.escape(ending) for ending in OUTPUT_ENDINGS)
    outputs = re.compile(rf"(?:{stem_names})(?:_face\d+)?(?:{endings})")
    folder = out.resolve()
    for key, image in local.items():
        if Path(key).parent == folder and outputs.fullmatch(Path(key).name):
            raise ValueError(f"--out {out}: an output would replace the input {image}; choose another --out")
    if summary is not None and summary.resolve().parent == folder and outputs.fullmatch(summary.name):
        raise ValueError(f"--json {summary}: is where an image's output goes; give another name")


def predict_images(bundle: ModelBundle, images: list[str | Path], out: Path, box: np.ndarray | None = None,
                   all_faces: bool = False) -> Predictions:
    """Predict every image's face(s) (each a path or an ``s3://`` URI, each once): ``box`` for
    all, else the detector's largest (or every) face. An image that cannot be read is listed
    with its reason and the others go on."""
    predictor = bundle.predictor()
    detector = MtcnnFaceDetector()
    out.mkdir(parents=True, exist_ok=True)
    distinct, repeated = distinct_images([str(image) for image in images])
    for image, count in repeated.items():
        LOG.warning("%s: given %d times; predicted once", image, count)
    stems = output_stems(distinct)
    records, no_face, failed = [], [], []
    for image_path in distinct:
        try:
            image = read_image(image_path)
        except (ValueError, OSError) as err:
            LOG.error("%s", err)
            failed.append({"image": image_path, "reason": str(err)})
            continue
        faces = find_faces(detector, image, box)
        if not faces:
            LOG.error("%s: no face found by the face detector (give --box to predict it)", image_path)
            no_face.append(image_path)
            continue
        for face, found in enumerate(faces if all_faces else faces[:1]):
            stem = f"{stems[image_path]}_face{face}" if all_faces else stems[image_path]
            records.append(predict_face(predictor, detector, image, image_path, face, found, out / stem))
    return Predictions(records, no_face, failed, repeated)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:  # everything the command line names, before any work
        box = None if args.box is None else parse_box(args.box)
        images = [input_file(image, "image") for image in args.images]
        check_outputs(args.out, args.json, output_stems(distinct_images(images)[0]))
        if args.model_uri:
            bundle = bundle_from_model_uri(args.model_uri, args.tracking_uri)
        else:
            model_file = local_file(args.checkpoint, "--checkpoint")
            try:
                bundle, _ = load_bundle(model_file)
            except ValueError as err:  # named as given, not as the copy of a URI's object
                raise ValueError(str(err).replace(str(model_file), args.checkpoint)) from err
    except ValueError as err:  # a ConfigError too
        LOG.error("%s", err)
        return 2
    predictions = predict_images(bundle, images, args.out, box, args.all_faces)
    counts = predictions.counts(len(images))
    print(f"{counts['faces']} face(s) in {counts['with_faces']} image(s) -> {args.out}"
          + (f"; no face found in {counts['no_face']}" if counts["no_face"] else "")
          + (f"; {counts['failed']} could not be read" if counts["failed"] else "")
          + (f"; {counts['given'] - counts['distinct']} given again (predicted once)"
             if counts["given"] > counts["distinct"] else ""))
    write_json(args.json, predictions.to_json(args.model_uri or str(args.checkpoint), len(images)))
    return 1 if predictions.no_face or predictions.failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
