"""The 62-d label of a sample: from a .mat annotation and a crop box, and the way back.

For a box ``(sx, sy, ex, ey)`` with crop scales ``s_x = 120 / (ex - sx)``, ``s_y = 120 / (ey - sy)``
(equal for the square boxes the crop rules make) and an image of height H::

    f*R rows   = s_x * scale * R[0],  s_y * scale * R[1],  (s_x + s_y) / 2 * scale * R[2]
    t'x        = s_x (tx - sx)
    t'y        = 121 - s_y (H + 1 - ty - sy)
    t'z        = (s_x + s_y) / 2 * tz
    alpha_shp  = Shape_Para[:40],   alpha_exp = Exp_Para[:10]

so that the label's landmarks, mapped to crop pixels (``y_crop = 121 - y``, see
:mod:`models.frame`) and back through the box, are the .mat's image-space landmarks
``X = scale R S + t`` with image row ``H + 1 - X_y``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.frame import CROP_SIZE, box_scales, param_frame_to_crop, param_frame_to_image, reflect
from models.morphable import MorphableModel
from models.params import (
    EXPRESSION_SLICE,
    NUM_EXPRESSION,
    NUM_PARAMS,
    NUM_SHAPE,
    SHAPE_SLICE,
    angles_from_rotation,
    compose_params,
    rotation_from_angles,
    scale_rotation_from_camera,
    split_params,
)
from preprocessing.annotations import MatAnnotation
from preprocessing.errors import InvalidValueError


def annotation_arrays(annotations: Sequence[MatAnnotation]) -> tuple[np.ndarray, np.ndarray]:
    """The ``Pose_Para`` (B, 7) of annotations and their 62-d parameters with P left zero (B, 62)."""
    poses = np.array([annotation.pose_para[:7] for annotation in annotations], dtype=np.float64)
    params = np.zeros((len(annotations), NUM_PARAMS))
    for row, annotation in zip(params, annotations, strict=True):
        row[SHAPE_SLICE] = annotation.shape_para[:NUM_SHAPE]
        row[EXPRESSION_SLICE] = annotation.exp_para[:NUM_EXPRESSION]
    return poses.reshape(-1, 7), params


def posed_landmarks(
    model: MorphableModel, poses: np.ndarray, params: np.ndarray, image_heights: np.ndarray
) -> np.ndarray:
    """The 68 landmarks of ``Pose_Para`` (..., 7) and shape / expression parameters (..., 62) in
    image coordinates (..., 3, 68): row y is the image row (1-based, down), z the rotated,
    scaled depth (toward the camera)."""
    pitch, yaw, roll, tx, ty, tz, scale = np.moveaxis(np.asarray(poses, dtype=np.float64), -1, 0)
    shape = model.shapes(params, model.landmark_indices)
    points = scale[..., None, None] * (rotation_from_angles(pitch, yaw, roll) @ shape)
    points += np.stack([tx, ty, tz], axis=-1)[..., None]
    points[..., 1, :] = reflect(points[..., 1, :], np.asarray(image_heights, dtype=np.float64)[..., None])
    return points


def image_landmarks(model: MorphableModel, annotation: MatAnnotation, image_height: int) -> np.ndarray:
    """The 68 landmarks the annotation's parameters give, in image coordinates (3, 68)."""
    poses, params = annotation_arrays([annotation])
    return posed_landmarks(model, poses, params, np.array([image_height]))[0]


def labels_from_poses(
    poses: np.ndarray, params: np.ndarray, boxes: np.ndarray, image_heights: np.ndarray,
    size: int = CROP_SIZE,
) -> np.ndarray:
    """62-d labels (..., 62) of ``Pose_Para`` (..., 7) and shape / expression parameters (..., 62)
    of faces cropped by boxes (..., 4) from images of the given heights; see the module docstring.
    Non-finite values are left for the caller to report."""
    boxes = np.asarray(boxes, dtype=np.float64)
    heights = np.asarray(image_heights, dtype=np.float64)
    pitch, yaw, roll, tx, ty, tz, scale = np.moveaxis(np.asarray(poses, dtype=np.float64), -1, 0)
    s_x, s_y = box_scales(boxes, size)
    s_z = (s_x + s_y) / 2.0
    row_scales = np.stack([s_x, s_y, s_z], axis=-1)[..., None]  # (..., 3, 1)
    scaled_rotation = scale[..., None, None] * rotation_from_angles(pitch, yaw, roll) * row_scales
    translation = np.stack([
        s_x * (tx - boxes[..., 0]),
        reflect(s_y * (reflect(ty, heights) - boxes[..., 1]), size),
        s_z * tz,
    ], axis=-1)
    alpha_shp, alpha_exp = params[..., SHAPE_SLICE], params[..., EXPRESSION_SLICE]
    return compose_params(scaled_rotation, translation, alpha_shp, alpha_exp)


def label_from_annotation(
    annotation: MatAnnotation, box: np.ndarray, image_height: int, size: int = CROP_SIZE
) -> np.ndarray:
    """The 62-d label (float64) of an annotated face cropped by ``box``; see the module docstring."""
    poses, params = annotation_arrays([annotation])
    boxes = np.asarray(box, dtype=np.float64)[None]
    label = labels_from_poses(poses, params, boxes, np.array([image_height]), size)[0]
    if not np.all(np.isfinite(label)):
        raise InvalidValueError(annotation.path, "label holds NaN or inf")
    return label


def pose_para_from_label(
    label: np.ndarray, box: np.ndarray, image_height: int, size: int = CROP_SIZE
) -> np.ndarray:
    """The way back: a label and its box -> the .mat's ``Pose_Para`` (7,).

    Angles come back canonical and the scale positive (see :func:`canonical_angles`).
    """
    box = np.asarray(box, dtype=np.float64)
    scaled_rotation, translation, _, _ = split_params(np.asarray(label, dtype=np.float64))
    s_x, s_y = box_scales(box, size)
    s_z = (s_x + s_y) / 2.0
    image_scaled = scaled_rotation / np.array([[s_x], [s_y], [s_z]])
    # A mirrored (negative-scale) annotation comes back as |scale| and the rotation it projects
    # like, see canonical_angles.
    scale, rotation = scale_rotation_from_camera(image_scaled)
    tx = translation[0] / s_x + box[0]
    ty = reflect(box[1], image_height) - reflect(translation[1], size) / s_y
    tz = translation[2] / s_z
    return np.concatenate([angles_from_rotation(rotation), [tx, ty, tz, scale]])


def canonical_angles(pose_para: np.ndarray) -> np.ndarray:
    """(pitch, yaw, roll) of a ``Pose_Para`` (7,) as the label gives them back.

    Two spellings in real files are rewritten: angles outside yaw in [-90, 90] degrees (e.g.
    pitch -300 degrees: the same rotation, other angles), and a negative scale (``s R`` with
    ``s < 0`` projects like ``|s| Rz(180) R`` with z mirrored, so that rotation is the pose).
    """
    pose = np.asarray(pose_para, dtype=np.float64)
    rotation = rotation_from_angles(pose[0], pose[1], pose[2])
    if pose[6] < 0:
        rotation = np.diag([-1.0, -1.0, 1.0]) @ rotation
    return angles_from_rotation(rotation)


def crop_landmarks(model: MorphableModel, label: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The label's 68 landmarks in crop pixel coordinates (..., 3, 68), y down."""
    return param_frame_to_crop(model.landmarks(np.asarray(label, dtype=np.float64)), size)


def landmarks_in_image(
    model: MorphableModel, label: np.ndarray, box: np.ndarray, size: int = CROP_SIZE
) -> np.ndarray:
    """The label's 68 landmarks mapped back to image coordinates (3, 68)."""
    return param_frame_to_image(model.landmarks(np.asarray(label, dtype=np.float64)), box, size)


def transform_label(label: np.ndarray, transform: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The label after its crop is moved by a 2x3 crop -> crop similarity ``x' = K x + k``.

    In the parameter's y-up frame ``G = D K D`` with ``D = diag(1, -1)``: rows 0-1 of f*R become
    ``G`` times them, row 2 and tz scale by ``sqrt|det K|``, and the translation follows the
    frame's ``y = size + 1 - row``. A rotation or scale of the crop thus changes P only.
    Labels (..., 62) and transforms (..., 2, 3) broadcast against each other.
    """
    label = np.asarray(label, dtype=np.float64)
    transform = np.asarray(transform, dtype=np.float64)
    lead = np.broadcast_shapes(label.shape[:-1], transform.shape[:-2])
    label = np.broadcast_to(label, (*lead, label.shape[-1]))
    linear, offset = transform[..., :2], transform[..., 2]
    flip_y = np.diag([1.0, -1.0])
    g = flip_y @ linear @ flip_y
    s = np.sqrt(np.abs(np.linalg.det(linear)))[..., None]
    scaled_rotation, translation, alpha_shp, alpha_exp = split_params(label)
    new_rotation = np.empty(scaled_rotation.shape)
    new_rotation[..., :2, :] = g @ scaled_rotation[..., :2, :]
    new_rotation[..., 2, :] = s * scaled_rotation[..., 2, :]
    top = np.array([0.0, reflect(0.0, size)])
    new_translation = np.empty(translation.shape)
    new_translation[..., :2] = ((g @ (translation[..., :2] - top)[..., None])[..., 0]
                                + offset * [1.0, -1.0] + top)
    new_translation[..., 2] = s[..., 0] * translation[..., 2]
    return compose_params(new_rotation, new_translation, alpha_shp, alpha_exp)
