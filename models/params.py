"""The 62-d 3DMM parameter: layout, pose conversions and whitening.

Layout (3DDFA): ``[P (3x4, row-major) | alpha_shp (40) | alpha_exp (10)]`` with ``P = [f*R | t]``.
Indices 0-2, 4-6, 8-10 hold ``f*R``; 3, 7, 11 hold ``tx, ty, tz``.

Rotation convention (300W-LP ``Pose_Para``): ``R = Rx(pitch) @ Ry(yaw) @ Rz(roll)`` with
``Rx = [[1,0,0],[0,c,s],[0,-s,c]]``, ``Ry = [[c,0,-s],[0,1,0],[s,0,c]]``,
``Rz = [[c,s,0],[-s,c,0],[0,0,1]]``; angles in radians.

Every function takes a single parameter or a batch (leading dimensions are kept).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_POSE = 12
NUM_SHAPE = 40
NUM_EXPRESSION = 10
NUM_PARAMS = NUM_POSE + NUM_SHAPE + NUM_EXPRESSION  # 62
SHAPE_SLICE = slice(NUM_POSE, NUM_POSE + NUM_SHAPE)
EXPRESSION_SLICE = slice(NUM_POSE + NUM_SHAPE, NUM_PARAMS)

# Below this |cos(yaw)| the yaw is taken as +-90 degrees and roll as 0 (gimbal lock).
_GIMBAL_EPS = 1e-9


def _check_params(params: np.ndarray) -> np.ndarray:
    params = np.asarray(params)
    if params.shape[-1] != NUM_PARAMS:
        raise ValueError(f"expected parameters of shape (..., {NUM_PARAMS}), got {params.shape}")
    return params


def split_params(params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split (..., 62) into ``f*R`` (..., 3, 3), ``t`` (..., 3), alpha_shp (..., 40), alpha_exp (..., 10)."""
    params = _check_params(params)
    camera = params[..., :NUM_POSE].reshape(*params.shape[:-1], 3, 4)
    return camera[..., :3], camera[..., 3], params[..., SHAPE_SLICE], params[..., EXPRESSION_SLICE]


def compose_params(
    scaled_rotation: np.ndarray, translation: np.ndarray, alpha_shp: np.ndarray, alpha_exp: np.ndarray
) -> np.ndarray:
    """Inverse of :func:`split_params`: ``f*R`` (..., 3, 3), ``t`` (..., 3) and alphas -> (..., 62)."""
    scaled_rotation = np.asarray(scaled_rotation, dtype=np.float64)
    translation = np.asarray(translation, dtype=np.float64)
    camera = np.concatenate([scaled_rotation, translation[..., None]], axis=-1)
    pose = camera.reshape(*camera.shape[:-2], NUM_POSE)
    return np.concatenate([pose, np.asarray(alpha_shp), np.asarray(alpha_exp)], axis=-1)


def rotation_from_angles(pitch: np.ndarray, yaw: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """``R = Rx(pitch) @ Ry(yaw) @ Rz(roll)`` in 300W-LP's convention; angles (...,) -> (..., 3, 3)."""
    pitch, yaw, roll = np.broadcast_arrays(
        np.asarray(pitch, dtype=np.float64), np.asarray(yaw, dtype=np.float64),
        np.asarray(roll, dtype=np.float64),
    )
    cp, sp = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    cr, sr = np.cos(roll), np.sin(roll)
    rot = np.empty(pitch.shape + (3, 3))
    rot[..., 0, 0] = cy * cr
    rot[..., 0, 1] = cy * sr
    rot[..., 0, 2] = -sy
    rot[..., 1, 0] = -cp * sr + sp * sy * cr
    rot[..., 1, 1] = cp * cr + sp * sy * sr
    rot[..., 1, 2] = sp * cy
    rot[..., 2, 0] = sp * sr + cp * sy * cr
    rot[..., 2, 1] = -sp * cr + cp * sy * sr
    rot[..., 2, 2] = cp * cy
    return rot


def angles_from_rotation(rotation: np.ndarray) -> np.ndarray:
    """(pitch, yaw, roll) in radians from R (..., 3, 3) -> (..., 3); yaw in [-pi/2, pi/2].

    At gimbal lock (|yaw| = 90 degrees) roll is set to 0 and the whole in-plane turn goes to pitch.
    """
    rot = np.asarray(rotation, dtype=np.float64)
    sin_yaw = np.clip(-rot[..., 0, 2], -1.0, 1.0)
    yaw = np.arcsin(sin_yaw)
    cos_yaw = np.sqrt(np.maximum(0.0, 1.0 - sin_yaw**2))
    locked = cos_yaw < _GIMBAL_EPS
    pitch = np.where(
        locked,
        np.arctan2(rot[..., 1, 0] * np.sign(sin_yaw), rot[..., 1, 1]),
        np.arctan2(rot[..., 1, 2], rot[..., 2, 2]),
    )
    roll = np.where(locked, 0.0, np.arctan2(rot[..., 0, 1], rot[..., 0, 0]))
    return np.stack([pitch, yaw, roll], axis=-1)


def scale_rotation_from_camera(scaled_rotation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ``f*R`` (..., 3, 3) into the scale f (...,) and an orthonormal R (..., 3, 3).

    As in 3DDFA_V2's ``P2sRt``: f is the mean norm of the first two rows, R's rows are the two
    normalised rows and their cross product, so a regressed (not exactly orthogonal) ``f*R`` works.
    """
    m = np.asarray(scaled_rotation, dtype=np.float64)
    n1 = np.linalg.norm(m[..., 0, :], axis=-1)
    n2 = np.linalg.norm(m[..., 1, :], axis=-1)
    if np.any(n1 == 0) or np.any(n2 == 0):
        raise ValueError("f*R has a zero row: not a camera matrix")
    r1 = m[..., 0, :] / n1[..., None]
    r2 = m[..., 1, :] / n2[..., None]
    r3 = np.stack([r1[..., 1] * r2[..., 2] - r1[..., 2] * r2[..., 1],
                   r1[..., 2] * r2[..., 0] - r1[..., 0] * r2[..., 2],
                   r1[..., 0] * r2[..., 1] - r1[..., 1] * r2[..., 0]], axis=-1)  # r1 x r2
    return (n1 + n2) / 2.0, np.stack([r1, r2, r3], axis=-2)


def pose_angles(params: np.ndarray) -> np.ndarray:
    """(pitch, yaw, roll) in radians of parameters (..., 62) -> (..., 3)."""
    scaled_rotation, _, _, _ = split_params(params)
    _, rotation = scale_rotation_from_camera(scaled_rotation)
    return angles_from_rotation(rotation)


@dataclass(frozen=True)
class ParamStats:
    """Per-dimension whitening statistics of the 62-d parameter: ``x = (p - mean) / std``."""

    mean: np.ndarray  # (62,) float64
    std: np.ndarray  # (62,) float64

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape != (NUM_PARAMS,):
                raise ValueError(f"ParamStats.{name}: expected shape ({NUM_PARAMS},), got {value.shape}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"ParamStats.{name} holds NaN or inf")
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        if np.any(self.std <= 0):
            bad = np.flatnonzero(self.std <= 0).tolist()
            raise ValueError(f"ParamStats.std must be > 0 everywhere; dimensions {bad} are not")

    def whiten(self, params: np.ndarray) -> np.ndarray:
        return (_check_params(params) - self.mean) / self.std

    def dewhiten(self, whitened: np.ndarray) -> np.ndarray:
        return _check_params(whitened) * self.std + self.mean

    @classmethod
    def from_params(cls, params: np.ndarray, min_std: float = 1e-8) -> ParamStats:
        """Statistics of a set of parameters (N, 62); a constant dimension gets std ``min_std``."""
        params = _check_params(params).astype(np.float64)
        if params.ndim != 2 or len(params) == 0:
            raise ValueError(f"expected a non-empty (N, {NUM_PARAMS}) array, got {params.shape}")
        return cls(params.mean(axis=0), np.maximum(params.std(axis=0), min_std))

    @classmethod
    def from_text_files(cls, mean_path: Path, std_path: Path) -> ParamStats:
        """3DDFA's ``param_mean.txt`` / ``param_std.txt`` (62 numbers each)."""
        arrays = []
        for path in (Path(mean_path), Path(std_path)):
            try:
                values = np.loadtxt(path, dtype=np.float64).reshape(-1)
            except (OSError, ValueError) as err:
                raise ValueError(f"{path}: cannot read whitening statistics: {err}") from err
            if values.shape != (NUM_PARAMS,):
                raise ValueError(f"{path}: expected {NUM_PARAMS} numbers, found {values.size}")
            arrays.append(values)
        return cls(*arrays)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> ParamStats:
        return cls(np.asarray(data["mean"], dtype=np.float64), np.asarray(data["std"], dtype=np.float64))

    @property
    def identity(self) -> str:
        digest = hashlib.sha256(self.mean.tobytes() + self.std.tobytes()).hexdigest()
        return f"sha256:{digest[:16]}"
