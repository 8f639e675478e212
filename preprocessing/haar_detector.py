"""Faces found with the frontal-face Haar cascade that ships inside OpenCV 4.x.

    BGR image -> grayscale, equalised histogram -> Haar cascade -> square boxes -> adjusted to the
    face-detector box that 3DDFA_V2's crop rule expects -> largest first

Boxes are ``(x1, y1, x2, y2)`` in the project's 1-based pixel coordinates
(:mod:`models.frame`), the same thing ``frnet predict --box`` takes: a Haar hit covering
array columns ``x .. x + w - 1`` spans ``x + 0.5 .. x + w + 0.5`` there.

The Haar box is not the FaceBoxes box that 3DDFA_V2's crop rule (``detector_crop_box`` in
:mod:`models.frame`) was designed for: it is larger and sits higher. The box wanted is
the one whose 3DDFA_V2 crop equals the benchmark ROI of the ground-truth landmarks. Measured with
the default cascade and the parameters below on the two real faces in the reference data
(AFLW2000-3D image00427, yaw 7 deg, pitch 23 deg; 300W-LP IBUG_image_008_1_0, yaw -44 deg), each at
0.5, 0.75, 1 and 1.5 times its size and with scale steps 1.05 and 1.1: wanted side / Haar side
0.751 +- 0.005 and 0.711 +- 0.008; wanted centre below the Haar centre by 0.034 and 0.051 of the
Haar side; sideways +0.05 and -0.10 (follows the yaw, so not corrected). With the two means as
constants, 3DDFA_V2's released MobileNetV1-0.5 scores NME 2.86-3.09 % and 1.56-1.80 % on the two
faces (raw Haar box: 2.82-2.99 % and 3.13-4.06 %; the ground-truth landmark ROI: 2.71-2.73 % and
1.90-2.04 %).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# Of OpenCV's frontal cascades, ``default`` gave the steadier box on the real faces (side ratio
# spread 0.005-0.008 against 0.005-0.019 for ``alt2``, half the sideways offset on the turned face)
# and found more of 20 synthetic heads (15 against 13).
FRONTAL_FACE_CASCADE = "haarcascade_frontalface_default.xml"
# detectMultiScale: 10 % steps between window sizes and OpenCV's default of three overlapping hits.
# Three and five gave the same boxes on the real faces and no hit on their backgrounds, on 20
# synthetic backgrounds with the head greyed out or on noise; three found 15 of 20 synthetic heads,
# five 14. A 40 px face fills a 46 px crop (1.58 * 0.73 of it), already upsampled 2.6 times to 120.
SCALE_STEP = 1.1
MIN_NEIGHBOURS = 3
MIN_FACE_SIZE = 40
# Haar box -> 3DDFA_V2 detector box (module docstring): side times 0.73, centre down 0.04 of the
# Haar side; the means of the two real faces' 0.751 / 0.711 and 0.034 / 0.051.
HAAR_TO_DETECTOR_SCALE = 0.73
HAAR_TO_DETECTOR_SHIFT = 0.04


def cascade_path(name: str = FRONTAL_FACE_CASCADE) -> Path:
    """Where OpenCV keeps a cascade file; a ValueError if this build ships none (OpenCV 5)."""
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if folder is None or not hasattr(cv2, "CascadeClassifier"):
        raise ValueError(f"OpenCV {cv2.__version__} ships no Haar cascades (OpenCV 5 dropped them): "
                         "install opencv-python-headless<5, or give a face box")
    path = Path(folder) / name
    if not path.is_file():
        raise ValueError(f"{path}: no such cascade file in OpenCV {cv2.__version__}")
    return path


def haar_to_detector_boxes(rects: np.ndarray) -> np.ndarray:
    """Haar hits (N, 4) ``(x, y, w, h)`` in 0-based array pixels -> detector boxes (N, 4) float64
    ``(x1, y1, x2, y2)`` in 1-based pixels, resized and shifted as the module docstring measures."""
    rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    side = (rects[:, 2] + rects[:, 3]) / 2.0
    centre_x = rects[:, 0] + 0.5 + rects[:, 2] / 2.0
    centre_y = rects[:, 1] + 0.5 + rects[:, 3] / 2.0 + HAAR_TO_DETECTOR_SHIFT * side
    half = HAAR_TO_DETECTOR_SCALE * side / 2.0
    return np.stack([centre_x - half, centre_y - half, centre_x + half, centre_y + half], axis=1)


def largest_first(boxes: np.ndarray) -> np.ndarray:
    """Boxes (N, 4) sorted by area, largest first (ties keep their order)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return boxes[np.argsort(-areas, kind="stable")]


class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade, read from OpenCV's own data folder when constructed."""

    def __init__(self, min_face_size: int = MIN_FACE_SIZE, path: Path | None = None) -> None:
        if min_face_size < 1:
            raise ValueError(f"min_face_size must be a positive number of pixels, got {min_face_size}")
        self.path = cascade_path() if path is None else Path(path)
        self.cascade = cv2.CascadeClassifier(str(self.path))
        if self.cascade.empty():
            raise ValueError(f"{self.path}: not a readable Haar cascade")
        self.min_face_size = int(min_face_size)

    def detect(self, image: np.ndarray) -> np.ndarray:
        """Faces in ``image`` (H, W, 3) BGR uint8 -> boxes (N, 4) float64, largest first; N may be 0."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a BGR uint8 image (H, W, 3), got {image.dtype} {image.shape}")
        gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
        rects = self.cascade.detectMultiScale(
            gray, scaleFactor=SCALE_STEP, minNeighbors=MIN_NEIGHBOURS,
            minSize=(self.min_face_size, self.min_face_size),
        )
        return largest_first(haar_to_detector_boxes(rects))
