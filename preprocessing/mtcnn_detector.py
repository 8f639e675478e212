"""Faces and five points found with MTCNN (Zhang et al. 2016), run in torch on the weights that
ship inside the ``mtcnn`` package from PyPI (1.0.0, MIT): nothing is downloaded at run time and
the package's own TensorFlow code is not used (nor imported: its ``__init__`` needs TensorFlow).

    BGR image -> RGB, (v - 127.5) / 128 -> image pyramid -> P-Net proposals -> NMS -> R-Net
    refines -> O-Net scores, refines and gives five points -> NMS -> adjusted to the face-detector
    box that 3DDFA_V2's crop rule expects -> largest first

Boxes ``(x1, y1, x2, y2)`` and points are in the project's 1-based pixel coordinates
(:mod:`models.frame`), which are also MTCNN's own (its MATLAB original's): a box spans the centres
of its first and last pixels, ``x2 - x1 + 1`` pixels, and an R-Net or O-Net patch is resampled
(bilinear) from exactly those pixels; pyramid levels are ``ceil(side * scale)`` pixels. The rest is
the package's pipeline: P-Net regression before NMS, its NMS rule (a box goes when a better one
overlaps it, kept or not), squared boxes between stages, points placed in the box O-Net was given.
The pyramid is the original's (scales from 12 / min_face_size down while a 12-pixel window fits):
the package counts its levels without the minimum face size and, asked for 40-pixel faces, found
none in the three real photos. With the package's pyramid, level rounding and ``crop_and_resize``
sampling swapped in, this code gave the package's boxes, scores and points (TensorFlow 2.21, the
three photos, min_face_size 20) to 0.001 pixel; the three networks alone agree to 1e-6.

The O-Net box is not the FaceBoxes box that 3DDFA_V2's crop rule (``detector_crop_box`` in
:mod:`models.frame`) was designed for: it is tall, brows to chin, and sits high. The box wanted is
the one whose 3DDFA_V2 crop equals the benchmark ROI of the ground-truth landmarks (as for
:mod:`preprocessing.haar_detector`). Measured with the defaults below, as wanted side / mean O-Net side
(``(w + h) / 2``) and wanted centre below the O-Net centre in O-Net sides: AFLW2000-3D image00427
(yaw 7 deg) and 300W-LP IBUG_image_008_1_0 (yaw -44 deg), each at 0.5, 0.75, 1 and 1.5 times its
size: 0.858 +- 0.024 and 0.802 +- 0.017, down 0.005 and 0.067 (with scale_factor 0.8: 0.845 and
0.800, down 0.027 and 0.068); 40 synthetic AFLW2000-3D-style faces (``frnet synth``, seed 0, yaw up
to 90 deg, all 40 found): 0.777 +- 0.052, down 0.035 +- 0.028. Sideways offsets (+0.007,
-0.057, +0.017 +- 0.047) follow the yaw, so are not corrected. With the means of the three sets as
constants, 3DDFA_V2's released MobileNetV1-0.5 scores NME 2.51-2.86 % and 1.62-1.85 % on the two
real faces and 4.84 % on the synthetic ones (raw O-Net box: 2.14-2.58 %, 2.02-2.87 %, 5.17 %; the
ground-truth landmark ROI: 2.70-2.77 %, 1.83-2.04 %, 4.81 %).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.frame import INPUT_MEAN, INPUT_SCALE

MIN_FACE_SIZE = 40
THRESHOLDS = (0.6, 0.7, 0.7)  # P-Net, R-Net, O-Net face probability: MTCNN's published values
SCALE_FACTOR = 0.709  # between pyramid levels, the package's and the paper's
PNET_WINDOW = 12  # P-Net sees 12x12 windows two pixels apart
# (threshold, "union" or "min") of the package's NMS passes.
NMS_PNET_SCALE = (0.5, "union")
NMS_PNET_ALL = (0.7, "union")
NMS_RNET = (0.7, "union")
NMS_ONET = (0.7, "min")
# Arrays in each weight file (the Keras layers' weights in creation order).
WEIGHT_COUNTS = {"pnet": 13, "rnet": 16, "onet": 21}
# O-Net box -> 3DDFA_V2 detector box (module docstring): side times 0.81, centre down 0.04 of the
# O-Net side; the means of the three sets' 0.858 / 0.802 / 0.777 and 0.005 / 0.067 / 0.035.
MTCNN_TO_DETECTOR_SCALE = 0.81
MTCNN_TO_DETECTOR_SHIFT = 0.04


def weights_folder() -> Path:
    """The ``mtcnn`` package's weight folder, found without importing the package."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the MTCNN face detector's weights come from the mtcnn package: "
                         "pip install mtcnn==1.0.0 (a dependency of this project)")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "weights"


def load_weights(name: str, folder: Path | None = None) -> list[torch.Tensor]:
    """One network's Keras weights (``pnet``, ``rnet`` or ``onet``) as torch tensors: conv kernels
    (kh, kw, in, out) -> (out, in, kh, kw), dense (in, out) -> (out, in), PReLU slopes flattened."""
    import joblib

    path = (weights_folder() if folder is None else Path(folder)) / f"{name}.lz4"
    if not path.is_file():
        raise ValueError(f"{path}: no such MTCNN weight file (reinstall mtcnn==1.0.0)")
    arrays = joblib.load(path)
    if len(arrays) != WEIGHT_COUNTS[name]:
        raise ValueError(f"{path}: {len(arrays)} arrays, expected {WEIGHT_COUNTS[name]} (mtcnn 1.0.0's)")
    tensors = []
    for array in (np.asarray(a, dtype=np.float32) for a in arrays):
        if array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)
        elif array.ndim == 2:
            array = array.T
        elif array.ndim == 3:
            array = array.reshape(-1)
        tensors.append(torch.from_numpy(np.ascontiguousarray(array)))
    return tensors


def _max_pool_same(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Keras ``MaxPooling2D(padding="same")``: ``ceil(n / stride)`` outputs, the padding split
    with the odd pixel after, padded values never chosen."""
    pads = []
    for n in (x.shape[3], x.shape[2]):
        total = max((math.ceil(n / stride) - 1) * stride + size - n, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=-math.inf), size, stride)


def _conv(x: torch.Tensor, w: list[torch.Tensor], i: int) -> torch.Tensor:
    """Conv ``w[i], w[i + 1]`` then PReLU ``w[i + 2]``."""
    return F.prelu(F.conv2d(x, w[i], w[i + 1]), w[i + 2])


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """Keras ``Permute((2, 1, 3))`` then ``Flatten`` of NHWC: (N, C, H, W) flattened as (W, H, C)."""
    return x.permute(0, 3, 2, 1).flatten(1)


def pnet(x: torch.Tensor, w: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, H, W) -> box offsets (1, 4, h, w) and face probability (1, h, w)."""
    x = _conv(_max_pool_same(_conv(x, w, 0), 2, 2), w, 3)
    x = _conv(x, w, 6)
    return F.conv2d(x, w[9], w[10]), F.softmax(F.conv2d(x, w[11], w[12]), dim=1)[:, 1]


def rnet(x: torch.Tensor, w: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 24, 24) -> box offsets (N, 4) and face probability (N,)."""
    x = F.max_pool2d(_conv(_max_pool_same(_conv(x, w, 0), 3, 2), w, 3), 3, 2)
    x = F.prelu(F.linear(_flatten(_conv(x, w, 6)), w[9], w[10]), w[11])
    return F.linear(x, w[12], w[13]), F.softmax(F.linear(x, w[14], w[15]), dim=1)[:, 1]


def onet(x: torch.Tensor, w: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, 48, 48) -> box offsets (N, 4), points (N, 10) as x1..x5, y1..y5 in [0, 1] of the
    box, face probability (N,)."""
    x = F.max_pool2d(_conv(_max_pool_same(_conv(x, w, 0), 3, 2), w, 3), 3, 2)
    x = _conv(_max_pool_same(_conv(x, w, 6), 2, 2), w, 9)
    x = F.prelu(F.linear(_flatten(x), w[12], w[13]), w[14])
    return (F.linear(x, w[15], w[16]), F.linear(x, w[17], w[18]),
            F.softmax(F.linear(x, w[19], w[20]), dim=1)[:, 1])


def nms(boxes: np.ndarray, threshold: float, method: str) -> np.ndarray:
    """The package's NMS of boxes (N, 5+) sorted best first: a box is dropped when a better one
    (dropped or not) overlaps it by more than ``threshold``, as IoU (``union``) or intersection over
    the smaller area (``min``). Returns the kept rows."""
    x1, y1, x2, y2 = (boxes[:, i, None] for i in range(4))
    area = (x2 - x1) * (y2 - y1)
    inter = (np.clip(np.minimum(x2, x2.T) - np.maximum(x1, x1.T), 0, None)
             * np.clip(np.minimum(y2, y2.T) - np.maximum(y1, y1.T), 0, None))
    base = area + area.T - inter if method == "union" else np.minimum(area, area.T)
    with np.errstate(divide="ignore", invalid="ignore"):
        overlap = inter / base
    return boxes[~np.triu(overlap > threshold, k=1).any(axis=0)]


def _best_first(boxes: np.ndarray) -> np.ndarray:
    return boxes[np.argsort(-boxes[:, 4], kind="stable")]


def _square(boxes: np.ndarray) -> np.ndarray:
    """Boxes made square about their centres, side the longer of ``x2 - x1`` and ``y2 - y1``."""
    out = boxes.copy()
    centre = (boxes[:, :2] + boxes[:, 2:4]) / 2.0
    half = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[:, None] / 2.0
    out[:, :2], out[:, 2:4] = centre - half, centre + half
    return out


def _sides(boxes: np.ndarray) -> np.ndarray:
    """Pixel counts (N, 2) ``x2 - x1 + 1, y2 - y1 + 1`` of boxes (N, 4+)."""
    return np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1], axis=1)


def _regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """R-Net / O-Net box offsets (N, 4), in the box's pixel counts; boxes turned inside out go."""
    out = boxes.copy()
    out[:, :4] += offsets * np.tile(_sides(boxes), 2)
    return out[(out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])]


def patches(image: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Bilinear (size, size) patches of the normalised image (1, 3, H, W) over the pixels of each
    box (N, 4+) (1-based centres ``x1 .. x2``); outside the image is 0 (mid-grey)."""
    height, width = image.shape[2:]
    steps = (np.arange(size) + 0.5) / size
    # 0-based positions of the patch's pixel centres, then grid_sample's [-1, 1] (pixel edges).
    xs = boxes[:, 0, None] - 1.5 + steps * (boxes[:, 2, None] - boxes[:, 0, None] + 1)
    ys = boxes[:, 1, None] - 1.5 + steps * (boxes[:, 3, None] - boxes[:, 1, None] + 1)
    gx, gy = (2 * xs + 1) / width - 1, (2 * ys + 1) / height - 1
    grid = np.stack(np.broadcast_arrays(gx[:, None, :], gy[:, :, None]), axis=-1)
    return F.grid_sample(image.expand(len(boxes), -1, -1, -1), torch.from_numpy(grid.astype(np.float32)),
                         mode="bilinear", padding_mode="zeros", align_corners=False)


def mtcnn_to_detector_boxes(boxes: np.ndarray) -> np.ndarray:
    """O-Net boxes (N, 4) -> square detector boxes (N, 4), resized and shifted down as the module
    docstring measures."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    side = (boxes[:, 2] - boxes[:, 0] + boxes[:, 3] - boxes[:, 1]) / 2.0
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2.0
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2.0 + MTCNN_TO_DETECTOR_SHIFT * side
    half = MTCNN_TO_DETECTOR_SCALE * side / 2.0
    return np.stack([centre_x - half, centre_y - half, centre_x + half, centre_y + half], axis=1)


@dataclass(frozen=True)
class Detections:
    """Faces found in one image, largest box first.

    Attributes:
        boxes: (N, 4) float64 detector boxes (x1, y1, x2, y2), ready for ``detector_crop_box``.
        scores: (N,) float64 O-Net face probability.
        points: (N, 5, 2) float64 (x, y) of the image-left eye, image-right eye, nose tip, image-left
            and image-right mouth corner.
        mtcnn_boxes: (N, 4) float64 O-Net's own boxes, before the calibration.
    """

    boxes: np.ndarray
    scores: np.ndarray
    points: np.ndarray
    mtcnn_boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)


class MtcnnFaceDetector:
    """MTCNN's three networks in torch (CPU), their weights read when constructed from the mtcnn
    package (or ``weight_folder``, a folder of its three .lz4 files)."""

    def __init__(self, min_face_size: float = MIN_FACE_SIZE,
                 thresholds: tuple[float, float, float] = THRESHOLDS,
                 scale_factor: float = SCALE_FACTOR, weight_folder: Path | None = None) -> None:
        if not min_face_size >= PNET_WINDOW:
            raise ValueError(f"min_face_size must be at least {PNET_WINDOW} pixels (P-Net's window), "
                             f"got {min_face_size}")
        if len(thresholds) != 3 or not all(0.0 <= t < 1.0 for t in thresholds):
            raise ValueError(f"thresholds must be three face probabilities in [0, 1) (P-Net, R-Net, "
                             f"O-Net), got {thresholds}")
        if not 0.0 < scale_factor < 1.0:
            raise ValueError(f"scale_factor must be in (0, 1), got {scale_factor}")
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = float(scale_factor)
        self.weights = {name: load_weights(name, weight_folder) for name in WEIGHT_COUNTS}

    def scales(self, height: int, width: int) -> list[float]:
        """Pyramid scales: the smallest face fills P-Net's window, then steps down while the
        image still holds one window."""
        scale, out = PNET_WINDOW / self.min_face_size, []
        while min(height, width) * scale >= PNET_WINDOW:
            out.append(scale)
            scale *= self.scale_factor
        return out

    def proposals(self, image: np.ndarray) -> np.ndarray:
        """P-Net on every pyramid level of the normalised image (H, W, 3) -> square boxes (N, 5)
        ``x1, y1, x2, y2, probability``."""
        height, width = image.shape[:2]
        found = []
        for scale in self.scales(height, width):
            size = (math.ceil(width * scale), math.ceil(height * scale))
            level = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            offsets, probability = (t[0].numpy() for t in pnet(
                torch.from_numpy(level.transpose(2, 0, 1))[None], self.weights["pnet"]))
            rows, cols = np.nonzero(probability > self.thresholds[0])
            dx1, dy1, dx2, dy2 = offsets[:, rows, cols]
            # Window (row, col) covers level pixels 2c + 1 .. 2c + 12; its offsets are in 11 px.
            span = PNET_WINDOW - 1
            boxes = np.stack([2 * cols + 1 + span * dx1, 2 * rows + 1 + span * dy1,
                              2 * cols + PNET_WINDOW + span * dx2, 2 * rows + PNET_WINDOW + span * dy2],
                             axis=1) / scale
            found.append(nms(_best_first(np.column_stack([boxes, probability[rows, cols]])), *NMS_PNET_SCALE))
        return _square(nms(_best_first(np.concatenate(found or [np.zeros((0, 5))])), *NMS_PNET_ALL))

    def refine(self, image: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
        """R-Net on 24x24 patches of the proposals (N, 5) -> square boxes (M, 5)."""
        offsets, probability = rnet(patches(image, boxes, 24), self.weights["rnet"])
        boxes = np.column_stack([boxes[:, :4], probability.numpy()])
        keep = boxes[:, 4] > self.thresholds[1]
        boxes = _regress(boxes[keep], offsets.numpy()[keep])
        return _square(nms(_best_first(boxes), *NMS_RNET))

    def output(self, image: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
        """O-Net on 48x48 patches of the refined boxes (N, 5) -> (M, 15) ``x1, y1, x2, y2,
        probability, x1..x5, y1..y5`` of the points."""
        offsets, points, probability = (t.numpy() for t in onet(patches(image, boxes, 48),
                                                                 self.weights["onet"]))
        sides = _sides(boxes)
        points = np.concatenate([points[:, :5] * sides[:, :1] + boxes[:, :1] - 1,
                                 points[:, 5:] * sides[:, 1:] + boxes[:, 1:2] - 1], axis=1)
        keep = probability > self.thresholds[2]
        boxes = np.column_stack([boxes[:, :4], probability, points])[keep]
        return nms(_best_first(_regress(boxes, offsets[keep])), *NMS_ONET)

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> Detections:
        """Faces in ``image`` (H, W, 3) BGR uint8; N may be 0."""
        normalised = _normalised(image)
        tensor = torch.from_numpy(normalised.transpose(2, 0, 1).copy())[None]
        faces = self.proposals(normalised)
        if len(faces):
            faces = self.refine(tensor, faces)
        faces = self.output(tensor, faces) if len(faces) else np.zeros((0, 15))
        boxes = mtcnn_to_detector_boxes(faces[:, :4])
        order = np.argsort(-(boxes[:, 2] - boxes[:, 0]), kind="stable")
        return Detections(boxes=boxes[order], scores=faces[order, 4],
                          points=np.stack([faces[order, 5:10], faces[order, 10:15]], axis=-1),
                          mtcnn_boxes=faces[order, :4].copy())

    @torch.no_grad()
    def face_probability(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """O-Net's face probability (N,) of the squared ``boxes`` (N, 4) ``x1, y1, x2, y2`` in
        ``image`` (H, W, 3) BGR uint8: how face-like a region is, whatever found it."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros(0)
        tensor = torch.from_numpy(_normalised(image).transpose(2, 0, 1).copy())[None]
        squared = _square(np.column_stack([boxes, np.zeros(len(boxes))]))
        return onet(patches(tensor, squared, 48), self.weights["onet"])[2].numpy().astype(np.float64)


def _normalised(image: np.ndarray) -> np.ndarray:
    """A BGR uint8 image (H, W, 3) -> RGB float32 in MTCNN's range, (v - 127.5) / 128."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a BGR uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    # MTCNN was trained with the normalisation the network's crops use.
    return (cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32) - INPUT_MEAN) / INPUT_SCALE
