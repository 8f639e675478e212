"""Landmarks, head pose and a mesh for face images, from a registered model or a model file.

    frnet predict --model-uri models:/mobile-frnet@champion [--tracking-uri URI] IMAGE... \\
        [--box x1,y1,x2,y2 | --all-faces] [--out DIR] [--json PATH]
    frnet predict --checkpoint runs/default/models/mobile-frnet.pt IMAGE... [--box ...]

``--box`` is a face detector's box (x1, y1, x2, y2 in pixels) used for every image. Without it
each image goes through OpenCV's frontal-face Haar detector (:mod:`preprocessing.detection`) and
its largest face is predicted, or with ``--all-faces`` every face. Either box is cropped by
3DDFA_V2's rule. Per face it writes ``STEM.json`` (68 landmarks in image pixels, pitch / yaw /
roll, the box and ``box_source``: ``argument`` or ``opencv-haar``, the crop box),
``STEM_overlay.png`` and, when the morphable model has triangles, ``STEM.obj`` (the dense mesh in
image pixels, y up); with ``--all-faces`` the stem is ``STEM_face{i}``, i = 0 for the largest face.

Exit status: 0; 1 for a bad ``--box``, model file or unreadable image (images after it are not
predicted), or when the detector found no face in an image (logged, listed under ``no_face`` in
``--json``, the other images still written); 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

from models.checkpoint import ModelBundle, load_bundle
from models.predictor import FacePredictor, Prediction
from pipeline.common import setup_logging, write_json
from pipeline.tracking import bundle_from_model_uri
from preprocessing.detection import HaarFaceDetector
from preprocessing.overlay import draw_box, draw_landmarks

LOG = logging.getLogger("frnet.predict")
BOX_ARGUMENT = "argument"
BOX_DETECTOR = "opencv-haar"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="frnet predict", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-uri", help="a registered model, e.g. models:/mobile-frnet@champion")
    source.add_argument("--checkpoint", type=Path, help="the project's model file")
    parser.add_argument("--tracking-uri", help="with --model-uri: the MLflow store")
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    faces = parser.add_mutually_exclusive_group()
    faces.add_argument("--box", help="face box x1,y1,x2,y2 in pixels (all images); without it "
                       "OpenCV's Haar detector finds the faces")
    faces.add_argument("--all-faces", action="store_true",
                       help="every face the detector finds, not only the largest")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    parser.add_argument("--json", type=Path, help="a summary of every face's outputs")
    return parser.parse_args(argv)


def parse_box(text: str) -> np.ndarray:
    try:
        box = np.array([float(v) for v in text.split(",")])
    except ValueError as err:
        raise ValueError(f"--box {text!r}: expected four numbers x1,y1,x2,y2") from err
    if box.shape != (4,) or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"--box {text!r}: expected x1,y1,x2,y2 with x2 > x1 and y2 > y1")
    return box


def overlay(image: np.ndarray, prediction: Prediction) -> np.ndarray:
    """The image with the 68 landmarks and the crop box drawn."""
    return draw_box(draw_landmarks(image, prediction.landmarks), prediction.box)


def write_obj(path: Path, vertices: np.ndarray, triangles: np.ndarray) -> None:
    """A Wavefront mesh: image pixels with y flipped up, so viewers show the face upright."""
    lines = [f"v {x:.4f} {-y:.4f} {z:.4f}" for x, y, z in vertices.T]
    # Image y points down, which mirrors the mesh; reversing the order keeps faces outward.
    lines += [f"f {a + 1} {c + 1} {b + 1}" for a, b, c in triangles]
    path.write_text("\n".join(lines) + "\n")


def read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    return image


def predict_face(predictor: FacePredictor, image: np.ndarray, image_path: Path, face: int,
                 detection: np.ndarray, box_source: str, stem_path: Path) -> dict:
    """Predict one face from its detector box; write ``stem_path`` + .json, _overlay.png, .obj."""
    prediction = predictor.predict(image, detection=detection)
    pitch, yaw, roll = np.rad2deg(prediction.pose)
    record = {
        "image": str(image_path), "face": face, "box": detection.tolist(), "box_source": box_source,
        "crop_box": prediction.box.tolist(), "landmarks": prediction.landmarks.T.round(3).tolist(),
        "pose_degrees": {"pitch": float(pitch), "yaw": float(yaw), "roll": float(roll)},
        "overlay": f"{stem_path}_overlay.png",
    }
    cv2.imwrite(record["overlay"], overlay(image, prediction))
    if predictor.model.triangles is not None:
        record["mesh"] = f"{stem_path}.obj"
        write_obj(Path(record["mesh"]), prediction.vertices, predictor.model.triangles)
    Path(f"{stem_path}.json").write_text(json.dumps(record, indent=1) + "\n")
    LOG.info("%s face %d: yaw %.1f, pitch %.1f, roll %.1f degrees", image_path.name, face, yaw, pitch, roll)
    return record


def predict_images(bundle: ModelBundle, images: list[Path], out: Path, box: np.ndarray | None = None,
                   all_faces: bool = False) -> tuple[list[dict], list[str]]:
    """Predict every image's face(s): ``box`` for all, else the detector's largest (or every) face.

    Returns the per-face records and the images in which the detector found no face.
    """
    predictor = bundle.predictor()
    detector = HaarFaceDetector() if box is None else None
    out.mkdir(parents=True, exist_ok=True)
    records, no_face = [], []
    for image_path in images:
        image = read_image(image_path)
        if detector is None:
            boxes, source = box[None], BOX_ARGUMENT
        else:
            boxes, source = detector.detect(image), BOX_DETECTOR
            if len(boxes) == 0:
                LOG.error("%s: no face found by OpenCV's Haar face detector (give --box to predict it)",
                          image_path)
                no_face.append(str(image_path))
                continue
        for face, detection in enumerate(boxes if all_faces else boxes[:1]):
            stem = f"{image_path.stem}_face{face}" if all_faces else image_path.stem
            records.append(predict_face(predictor, image, image_path, face, detection, source, out / stem))
    return records, no_face


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        box = None if args.box is None else parse_box(args.box)
        if args.model_uri:
            bundle = bundle_from_model_uri(args.model_uri, args.tracking_uri)
        else:
            bundle, _ = load_bundle(args.checkpoint)
        records, no_face = predict_images(bundle, args.images, args.out, box, args.all_faces)
    except ValueError as err:
        LOG.error("%s", err)
        return 1
    done = len(args.images) - len(no_face)
    print(f"{len(records)} face(s) in {done} image(s) -> {args.out}"
          + (f"; no face found in {len(no_face)}" if no_face else ""))
    write_json(args.json, {"model": args.model_uri or str(args.checkpoint), "images": records,
                           "no_face": no_face})
    return 1 if no_face else 0


if __name__ == "__main__":
    sys.exit(main())
