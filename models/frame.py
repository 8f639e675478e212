"""The project's coordinate frame: the 120x120 crop, its boxes and transforms, the parameter
frame, the network's input normalisation and the NME, in numpy and (where training needs them)
torch forms side by side. Nothing else defines these.

Coordinate convention (one for the whole project): points are in **1-based pixel coordinates**,
as in the 300W-LP / AFLW2000-3D .mat files (MATLAB): the centre of array pixel ``[row r, col c]``
(0-based) is ``(x, y) = (c + 1, r + 1)``, y pointing down. Crop coordinates follow the same rule in
the crop. A box is ``(sx, sy, ex, ey)`` in image coordinates and maps onto the crop by
``x_crop = (x - sx) * size / (ex - sx)``, ``y_crop = (y - sy) * size / (ey - sy)``.

The 62-d parameter's own frame has y pointing up: ``y_crop = size + 1 - y_param`` (3DDFA v1's
``121 - y``; 3DDFA_V2's ``x - 1, 120 - y`` is the same frame written 0-based).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

# The torch forms import torch themselves: the numpy users (preprocessing's Ray Data tasks) would
# otherwise pay for importing it in every process.
if TYPE_CHECKING:
    import torch

CROP_SIZE = 120
# Network input (3DDFA's, kept so published checkpoints work unchanged): the crop in BGR order,
# ``(x - INPUT_MEAN) / INPUT_SCALE``.
INPUT_MEAN = 127.5
INPUT_SCALE = 128.0
# The convention recorded in model files.
COORDINATES = f"1-based pixel centres; parameter frame y up: crop row = {CROP_SIZE + 1} - y"
# Landmark rule (3DDFA benchmark ROI): square box around the landmarks' bbox, side = its diagonal.
LANDMARK_BOX_FACTOR = math.sqrt(2.0)
# Detector-box rule (3DDFA_V2 ``parse_roi_box_from_bbox``): centre shifted down by 0.14 of the
# mean side, side 1.58 times it.
DETECTOR_BOX_SHIFT = 0.14
DETECTOR_BOX_FACTOR = 1.58


def _check_box(box: np.ndarray) -> np.ndarray:
    box = np.asarray(box, dtype=np.float64)
    if box.shape[-1] != 4:
        raise ValueError(f"a box is (sx, sy, ex, ey); got shape {box.shape}")
    if not np.all(box[..., 2:] > box[..., :2]):  # one call: this runs for every crop
        raise ValueError(f"degenerate box (ex <= sx or ey <= sy, or not finite): {box.tolist()}")
    return box


def landmark_crop_box(landmarks: np.ndarray) -> np.ndarray:
    """Square crop box from 2D landmarks (..., 2 or 3, K) -> (..., 4): 3DDFA's benchmark ROI rule.

    bbox of the landmarks, centre c, ``r = max(w, h) / 2``, side ``L = sqrt(2) * 2r``.
    """
    points = np.asarray(landmarks, dtype=np.float64)[..., :2, :]
    if points.ndim < 2 or points.shape[-1] < 2 or not np.all(np.isfinite(points)):
        raise ValueError(f"expected finite landmarks of shape (..., 2, K>=2), got {points.shape}")
    lo, hi = points.min(axis=-1), points.max(axis=-1)
    centre = (lo + hi) / 2.0
    radius = (hi - lo).max(axis=-1) / 2.0
    if np.any(radius <= 0):
        raise ValueError("degenerate landmarks: all points coincide")
    half = (LANDMARK_BOX_FACTOR * radius)[..., None]
    return np.concatenate([centre - half, centre + half], axis=-1)


def detector_crop_box(detection: np.ndarray) -> np.ndarray:
    """Square crop box from a face-detector box (x1, y1, x2, y2) -> (4,): 3DDFA_V2's rule."""
    x1, y1, x2, y2 = _check_box(detection)
    size = (x2 - x1 + y2 - y1) / 2.0
    cx = (x1 + x2) / 2.0
    cy = (y1 + y2) / 2.0 + DETECTOR_BOX_SHIFT * size
    half = DETECTOR_BOX_FACTOR * size / 2.0
    return np.array([cx - half, cy - half, cx + half, cy + half])


def box_scales(box: np.ndarray, size: int = CROP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Image -> crop scale factors (s_x, s_y) of boxes (..., 4), each of shape (...)."""
    box = _check_box(box)
    return size / (box[..., 2] - box[..., 0]), size / (box[..., 3] - box[..., 1])


def image_to_crop(points: np.ndarray, box: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Image coordinates (2 or 3, K) -> crop coordinates; a z row is scaled by the mean scale."""
    points = np.asarray(points, dtype=np.float64)
    s_x, s_y = box_scales(box, size)
    out = points.copy()
    out[0] = (points[0] - box[0]) * s_x
    out[1] = (points[1] - box[1]) * s_y
    if len(points) > 2:
        out[2:] = points[2:] * (s_x + s_y) / 2.0
    return out


def crop_to_image(points: np.ndarray, box: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Inverse of :func:`image_to_crop`."""
    points = np.asarray(points, dtype=np.float64)
    s_x, s_y = box_scales(box, size)
    out = points.copy()
    out[0] = points[0] / s_x + box[0]
    out[1] = points[1] / s_y + box[1]
    if len(points) > 2:
        out[2:] = points[2:] * 2.0 / (s_x + s_y)
    return out


def reflect(values: Any, size: Any = CROP_SIZE) -> Any:
    """1-based coordinates reflected across a span of ``size`` pixels: ``size + 1 - v``. This is
    the crop's y (down) against the parameter frame's (up), an image's rows against its .mat's
    y-up frame (``size`` = the image height), and a horizontal mirror's x. numpy or torch."""
    return size + 1 - values


def mirror_transform(size: int = CROP_SIZE) -> np.ndarray:
    """The horizontal mirror of a crop as a 2x3 affine in 1-based coordinates: ``x -> size + 1 - x``."""
    return np.array([[-1.0, 0.0, reflect(0.0, size)], [0.0, 1.0, 0.0]])


def param_frame_to_crop(points: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Points in the parameter's frame (y up) (..., 3, K) -> crop coordinates (y down)."""
    out = np.array(points, dtype=np.float64, copy=True)
    out[..., 1, :] = reflect(out[..., 1, :], size)
    return out


def param_frame_to_image(points: np.ndarray, box: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Points in the parameter's frame (3, K) of the crop ``box`` -> image coordinates."""
    return crop_to_image(param_frame_to_crop(points, size), box, size)


def param_frame_to_crop_torch(points: torch.Tensor, size: int = CROP_SIZE) -> torch.Tensor:
    """:func:`param_frame_to_crop` for a batch of torch points (B, 3, K)."""
    import torch

    return torch.stack([points[:, 0], reflect(points[:, 1], size), points[:, 2]], 1)


def crop_affine(box: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """2x3 matrix taking 0-based image array positions to 0-based crop array positions.

    In 1-based coordinates ``x_c = s (x - sx)``; with ``x = c + 1`` and ``x_c = c_c + 1`` this is
    ``c_c = s c + s (1 - sx) - 1``.
    """
    s_x, s_y = box_scales(box, size)
    return np.array(
        [[s_x, 0.0, s_x * (1.0 - box[0]) - 1.0], [0.0, s_y, s_y * (1.0 - box[1]) - 1.0]]
    )


def crop_image(image: np.ndarray, box: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Bilinear crop of ``image`` (H, W, C) uint8 to (size, size, C); outside the image is black."""
    return warp_image(image, box_transform(box, size), size)


def nme_normaliser(truth: np.ndarray) -> np.ndarray:
    """sqrt(w * h) of the 2D bbox of ground-truth points (..., 2+, K) -> (...): the benchmarks'
    normaliser of point errors."""
    truth = np.asarray(truth, dtype=np.float64)[..., :2, :]
    extent = truth.max(axis=-1) - truth.min(axis=-1)  # (..., 2)
    return np.sqrt(extent[..., 0] * extent[..., 1])


def nme(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """2D NME of landmarks (..., 2+, K): mean point error over sqrt(w*h) of the truth's 2D bbox."""
    predicted = np.asarray(predicted, dtype=np.float64)[..., :2, :]
    truth = np.asarray(truth, dtype=np.float64)[..., :2, :]
    errors = np.linalg.norm(predicted - truth, axis=-2).mean(axis=-1)
    return errors / nme_normaliser(truth)


def nme_torch(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """:func:`nme` of a batch of torch landmarks (B, 2+, K) -> (B,); a degenerate truth bbox is
    floored at 1e-6 so that one bad row cannot turn a batch mean into inf."""
    import torch

    extent = truth[:, :2].amax(dim=2) - truth[:, :2].amin(dim=2)  # (B, 2)
    norm = torch.sqrt(extent[:, 0] * extent[:, 1]).clamp_min(1e-6)
    error = torch.linalg.vector_norm(predicted[:, :2] - truth[:, :2], dim=1).mean(dim=1)
    return error / norm


def normalise_input(images: torch.Tensor) -> torch.Tensor:
    """BGR uint8 crops (B, S, S, 3) -> the network's float input (B, 3, S, S) (a permuted view)."""
    return ((images.float() - INPUT_MEAN) / INPUT_SCALE).permute(0, 3, 1, 2)


def crops_to_tensor(crops: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """BGR uint8 crops (B, 120, 120, 3) as numpy -> the network's contiguous float32 input."""
    import torch

    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
        raise ValueError(f"expected crops of shape (B, {CROP_SIZE}, {CROP_SIZE}, 3), got {crops.shape}")
    return normalise_input(torch.from_numpy(np.ascontiguousarray(crops)).to(device)).contiguous()


def drawing_positions(points: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """1-based points (2+, K) -> 0-based array positions (K, 2) in the image enlarged ``scale``
    times by bilinear resizing, whose pixel centre c (0-based) lands at ``scale (c + 0.5) - 0.5``."""
    return (np.asarray(points[:2], dtype=np.float64).T - 0.5) * scale - 0.5


def box_transform(box: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """2x3 affines ``[M | d]`` (..., 2, 3) taking image coordinates to crop coordinates (both
    1-based) for boxes (..., 4)."""
    box = np.asarray(box, dtype=np.float64)
    s_x, s_y = box_scales(box, size)  # checks the boxes
    out = np.zeros((*box.shape[:-1], 2, 3))
    out[..., 0, 0], out[..., 0, 2] = s_x, -s_x * box[..., 0]
    out[..., 1, 1], out[..., 1, 2] = s_y, -s_y * box[..., 1]
    return out


def compose_transforms(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """2x3 affines (..., 2, 3): ``outer`` applied after ``inner``."""
    return np.concatenate([outer[..., :2] @ inner[..., :2], outer[..., :2] @ inner[..., 2:] + outer[..., 2:]],
                          axis=-1)


def apply_transform(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (2+, K) through a 2x3 affine; rows past the second are scaled by sqrt|det|."""
    points = np.asarray(points, dtype=np.float64)
    out = points.copy()
    out[:2] = transform[:, :2] @ points[:2] + transform[:, 2:]
    if len(points) > 2:
        out[2:] = points[2:] * np.sqrt(abs(np.linalg.det(transform[:, :2])))
    return out


def warp_image(image: np.ndarray, transform: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Sample a (size, size) crop of ``image`` through a 1-based image -> crop affine (bilinear,
    black outside). In 0-based array positions ``c' = L c + L 1 + d - 1``."""
    matrix = np.array(transform, dtype=np.float64)
    matrix[:, 2] += matrix[:, 0] + matrix[:, 1] - 1.0
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
