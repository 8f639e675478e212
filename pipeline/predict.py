"""Landmarks, head pose and a mesh for face images, from a registered model or a model file.

    frnet predict --model-uri models:/mobile-frnet@champion [--tracking-uri URI] IMAGE... \\
        --box x1,y1,x2,y2 [--out DIR] [--json PATH]
    frnet predict --checkpoint runs/default/models/mobile-frnet.pt IMAGE... --box ...

``--box`` is a face detector's box (x1, y1, x2, y2 in pixels), cropped by 3DDFA_V2's rule. Per
image it writes ``STEM.json`` (68 landmarks in image pixels, pitch / yaw / roll, the crop box),
``STEM_overlay.png`` and, when the morphable model has triangles, ``STEM.obj`` (the dense mesh in
image pixels, y up).
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
from models.predictor import Prediction
from pipeline.common import setup_logging, write_json
from pipeline.tracking import bundle_from_model_uri
from preprocessing.overlay import LANDMARK_GROUPS

LOG = logging.getLogger("frnet.predict")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="frnet predict", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-uri", help="a registered model, e.g. models:/mobile-frnet@champion")
    source.add_argument("--checkpoint", type=Path, help="the project's model file")
    parser.add_argument("--tracking-uri", help="with --model-uri: the MLflow store")
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--box", required=True, help="face box x1,y1,x2,y2 in pixels (all images)")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    parser.add_argument("--json", type=Path, help="a summary of every image's outputs")
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
    """The image with the 68 landmarks and the crop box drawn (1-based coordinates)."""
    canvas = image.copy()
    points = np.round(prediction.landmarks[:2].T - 1.0).astype(np.int32)
    for start, end, closed in LANDMARK_GROUPS:
        cv2.polylines(canvas, [points[start:end]], closed, (0, 255, 0), 1, cv2.LINE_AA)
    for x, y in points:
        cv2.circle(canvas, (int(x), int(y)), 2, (0, 255, 0), -1, cv2.LINE_AA)
    sx, sy, ex, ey = np.round(prediction.box - 1.0).astype(int)
    cv2.rectangle(canvas, (sx, sy), (ex, ey), (255, 128, 0), 1)
    return canvas


def write_obj(path: Path, vertices: np.ndarray, triangles: np.ndarray) -> None:
    """A Wavefront mesh: image pixels with y flipped up, so viewers show the face upright."""
    lines = [f"v {x:.4f} {-y:.4f} {z:.4f}" for x, y, z in vertices.T]
    # Image y points down, which mirrors the mesh; reversing the order keeps faces outward.
    lines += [f"f {a + 1} {c + 1} {b + 1}" for a, b, c in triangles]
    path.write_text("\n".join(lines) + "\n")


def predict_images(bundle: ModelBundle, images: list[Path], box: np.ndarray, out: Path) -> list[dict]:
    predictor = bundle.predictor()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for image_path in images:
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{image_path}: not a readable image")
        prediction = predictor.predict(image, detection=box)
        pitch, yaw, roll = np.rad2deg(prediction.pose)
        record = {
            "image": str(image_path), "crop_box": prediction.box.tolist(),
            "landmarks": prediction.landmarks.T.round(3).tolist(),
            "pose_degrees": {"pitch": float(pitch), "yaw": float(yaw), "roll": float(roll)},
            "overlay": str(out / f"{image_path.stem}_overlay.png"),
        }
        cv2.imwrite(record["overlay"], overlay(image, prediction))
        if predictor.model.triangles is not None:
            record["mesh"] = str(out / f"{image_path.stem}.obj")
            write_obj(Path(record["mesh"]), prediction.vertices, predictor.model.triangles)
        (out / f"{image_path.stem}.json").write_text(json.dumps(record, indent=1) + "\n")
        LOG.info("%s: yaw %.1f, pitch %.1f, roll %.1f degrees", image_path.name, yaw, pitch, roll)
        results.append(record)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        box = parse_box(args.box)
        if args.model_uri:
            bundle = bundle_from_model_uri(args.model_uri, args.tracking_uri)
        else:
            bundle, _ = load_bundle(args.checkpoint)
        results = predict_images(bundle, args.images, box, args.out)
    except ValueError as err:
        LOG.error("%s", err)
        return 1
    print(f"{len(results)} images -> {args.out}")
    write_json(args.json, {"model": args.model_uri or str(args.checkpoint), "images": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
