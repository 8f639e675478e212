"""Face detection for ``frnet predict``: OpenCV's Haar cascade (preprocessing/haar_detector.py) against
the MTCNN port (preprocessing/mtcnn_detector.py), on every real photo at hand and on a synthetic set.

    python benchmarks/face_detection.py [--images 100] [--backgrounds 25] [--checkpoint MODEL.pt] \\
        [--shared-data DIR] [--json PATH]

Images:
- real: AFLW2000-3D image00427 (its 256x256 ROI crop pasted back into its 450x450 frame, as the
  tests do; truth: the .mat's 68 landmarks) and 300W-LP IBUG_image_008_1_0 (truth: the 68
  landmarks its parameters give through bfm68), each at 0.5, 0.75, 1 and 1.5 times its size;
  matplotlib's grace_hopper.jpg, no landmarks: its face box was marked by eye, detection only;
- synthetic: ``--images`` AFLW2000-3D-style faces rendered by ``frnet synth``'s code, seed 1 (the
  detector was calibrated on seed 0), yaw up to 90 deg, and ``--backgrounds`` of its backgrounds
  with no face.

Per detector and set: faces found (a detection whose IoU with the truth box is >= 0.3; the truth
box is the detector box whose 3DDFA_V2 crop is the benchmark ROI of the landmarks, what both
detectors are calibrated to), false detections per image (every other detection, every detection
on a background), the mean IoU of the found faces, milliseconds per image (one thread), and the
project's 2D NME (%) of the model's landmarks cropped through the detected box, beside the same
faces cropped by the benchmark ROI of their truth. The model: ``--checkpoint`` (a project model
file), by default 3DDFA_V2's released MobileNetV1-0.5 from the reference data (on the synthetic
head, a model trained on other faces: compare its two NME columns, not with real faces).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.frame import DETECTOR_BOX_FACTOR, DETECTOR_BOX_SHIFT, landmark_crop_box, nme  # noqa: E402
from models.predictor import FacePredictor  # noqa: E402
from pipeline.runtime.stage_tools import write_json  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ZOOMS = (0.5, 0.75, 1.0, 1.5)
MATCH_IOU = 0.3
# matplotlib's sample photo of Grace Hopper (512x600): her face, brows to chin, marked by eye.
GRACE_HOPPER_FACE = np.array([180.0, 150.0, 340.0, 315.0])


@dataclass
class Sample:
    image: np.ndarray
    truth_box: np.ndarray | None  # None: a background, no face
    landmarks: np.ndarray | None  # (3, 68), None where unknown


def truth_detector_box(landmarks: np.ndarray) -> np.ndarray:
    """The detector box whose 3DDFA_V2 crop is the benchmark ROI of these landmarks."""
    sx, sy, ex, ey = landmark_crop_box(landmarks)
    side = (ex - sx) / DETECTOR_BOX_FACTOR
    cx, cy = (sx + ex) / 2, (sy + ey) / 2 - DETECTOR_BOX_SHIFT * side
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def zoomed(image: np.ndarray, landmarks: np.ndarray, zoom: float) -> Sample:
    """The image resized ``zoom`` times and its 1-based landmarks with it."""
    height, width = image.shape[:2]
    size = (round(width * zoom), round(height * zoom))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR)
    points = np.array(landmarks, dtype=np.float64)
    points[:2] = (points[:2] - 0.5) * zoom + 0.5
    points[2:] *= zoom
    return Sample(image, truth_detector_box(points), points)


def real_sets(shared: Path) -> dict[str, list[Sample]]:
    from models.morphable import MorphableModel
    from preprocessing.annotations import parse_mat
    from preprocessing.labels import image_landmarks

    def read_mat(path: Path):
        return parse_mat(path.read_bytes(), str(path))

    crop = cv2.imread(str(shared / "aflw2000-3d-image00427" / "image00427_roi_crop_256.png"))
    sx, sy, ex, ey = np.load(shared / "aflw2000-3d" / "protocol" / "AFLW2000-3D_crop.roi_box.npy")[255]
    width, height = round(ex - sx), round(ey - sy)
    aflw = np.zeros((450, 450, 3), np.uint8)
    aflw[round(sy):round(sy) + height, round(sx):round(sx) + width] = cv2.resize(
        crop, (width, height), interpolation=cv2.INTER_LINEAR)
    aflw_truth = read_mat(shared / "aflw2000-3d" / "mat" / "image00427.mat").pt3d_68
    lp_path = shared / "300w-lp-sample" / "IBUG_image_008_1_0.jpg"
    bfm68 = MorphableModel.from_bfm68_dir(shared / "bfm68")
    lp_truth = image_landmarks(bfm68, read_mat(lp_path.with_suffix(".mat")), 450)
    grace = cv2.imread(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    return {
        "AFLW2000-3D image00427 x0.5-1.5": [zoomed(aflw, aflw_truth, z) for z in ZOOMS],
        "300W-LP IBUG_image_008_1_0 x0.5-1.5": [zoomed(cv2.imread(str(lp_path)), lp_truth, z) for z in ZOOMS],
        "grace_hopper.jpg (no landmarks)": [Sample(grace, GRACE_HOPPER_FACE, None)],
    }


def synthetic_sets(folder: Path, images: int, backgrounds: int) -> dict[str, list[Sample]]:
    from preprocessing.annotations import parse_mat
    from preprocessing.render import random_background
    from preprocessing.synth import IMAGE_SIZE, SynthConfig, generate

    generate(SynthConfig("aflw2000-3d", n=images, seed=1), folder)
    faces = []
    for jpg in sorted(folder.glob("*.jpg")):
        truth = parse_mat(jpg.with_suffix(".mat").read_bytes(), str(jpg)).pt3d_68
        faces.append(Sample(cv2.imread(str(jpg)), truth_detector_box(truth), truth))
    empty = [Sample(random_background(np.random.default_rng([1, i]), IMAGE_SIZE, IMAGE_SIZE), None, None)
             for i in range(backgrounds)]
    return {f"synthetic faces (seed 1, {len(faces)})": faces, f"synthetic backgrounds ({len(empty)})": empty}


def evaluate(detect: Callable[[np.ndarray], np.ndarray], samples: list[Sample],
             predictor: FacePredictor) -> dict:
    """Detection figures and NME of one detector (image -> detector boxes (N, 4)) on one set."""
    found, false, ious, seconds, nme_detected, nme_truth = 0, 0, [], 0.0, [], []
    for sample in samples:
        started = time.perf_counter()
        boxes = detect(sample.image)
        seconds += time.perf_counter() - started
        overlaps = [box_iou(box, sample.truth_box) for box in boxes] if sample.truth_box is not None else []
        best = int(np.argmax(overlaps)) if overlaps and max(overlaps) >= MATCH_IOU else None
        false += len(boxes) - (best is not None)
        if best is None:
            continue
        found += 1
        ious.append(overlaps[best])
        if sample.landmarks is not None:
            predicted = predictor.predict(sample.image, detection=boxes[best]).landmarks
            nme_detected.append(nme(predicted, sample.landmarks) * 100)
            nme_truth.append(nme(predictor.predict(sample.image, landmarks=sample.landmarks).landmarks,
                                 sample.landmarks) * 100)
    faces = sum(sample.truth_box is not None for sample in samples)

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return {"images": len(samples), "faces": faces, "found": found,
            "false_per_image": false / len(samples), "mean_iou": mean(ious),
            "ms_per_image": 1000 * seconds / len(samples), "nme_detected_box": mean(nme_detected),
            "nme_truth_roi": mean(nme_truth), "nme_faces": len(nme_detected)}


def load_predictor(checkpoint: Path | None, shared: Path) -> tuple[FacePredictor, str]:
    if checkpoint is not None:
        from models.checkpoint import load_bundle

        bundle, _ = load_bundle(checkpoint)
        return bundle.predictor(), str(checkpoint)
    from models.mobilenet_v1 import load_3ddfa_v2_checkpoint
    from models.morphable import MorphableModel
    from models.params import ParamStats

    bfm = shared / "bfm68"
    path = shared / "peers" / "3ddfa_v2_mb05_120x120.pth"
    network = load_3ddfa_v2_checkpoint(path, 0.5)
    stats = ParamStats.from_text_files(bfm / "param_mean_v2.txt", bfm / "param_std_v2.txt")
    predictor = FacePredictor(network, stats, MorphableModel.from_bfm68_dir(bfm))
    return predictor, f"3DDFA_V2 MobileNetV1-0.5 ({path.name})"


def detectors() -> Iterator[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    from preprocessing.haar_detector import HaarFaceDetector
    from preprocessing.mtcnn_detector import MtcnnFaceDetector

    yield "opencv-haar", HaarFaceDetector().detect
    mtcnn = MtcnnFaceDetector()
    yield "mtcnn", lambda image: mtcnn.detect(image).boxes


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100, help="synthetic faces")
    parser.add_argument("--backgrounds", type=int, default=25, help="synthetic backgrounds, no face")
    parser.add_argument("--checkpoint", type=Path, help="the project's model file (default: 3DDFA_V2's)")
    parser.add_argument("--shared-data", type=Path, default=Path(os.environ.get(
        "FRNET_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")), help="the reference data folder")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    predictor, model = load_predictor(args.checkpoint, args.shared_data)
    sets = real_sets(args.shared_data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets.update(synthetic_sets(Path(tmp), args.images, args.backgrounds))
        for name, detect in detectors():
            for set_name, samples in sets.items():
                rows.append({"set": set_name, "detector": name, **evaluate(detect, samples, predictor)})
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               "torch and OpenCV on 1 thread")
    print(f"machine: {machine}\nmodel: {model}\n")
    print("| set | detector | images | faces found | false / image | mean IoU | NME detected box % "
          "| NME truth ROI % | ms / image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: list(sets).index(r["set"])):
        print(f"| {row['set']} | {row['detector']} | {row['images']} | {row['found']} / {row['faces']} "
              f"| {row['false_per_image']:.2f} | {fmt(row['mean_iou'], 2)} "
              f"| {fmt(row['nme_detected_box'], 2)} | {fmt(row['nme_truth_roi'], 2)} "
              f"| {row['ms_per_image']:.0f} |")
    write_json(args.json, {"machine": machine, "machine_arch": platform.machine(), "cores": os.cpu_count(),
                           "model": model, "match_iou": MATCH_IOU, "synthetic_images": args.images,
                           "synthetic_backgrounds": args.backgrounds, "rows": rows})


if __name__ == "__main__":
    main()
