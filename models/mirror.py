"""Left/right mirroring of the 62-d parameter: the label of a horizontally flipped crop.

A flip mirrors the face (``S'`` = the mirrored shape, vertex v taking the place of its mirror
image) and the camera: with ``F = diag(-1, 1, 1)``::

    f*R'  = F (f*R) F          (yaw and roll change sign; still a scaled rotation)
    t'x   = size + 1 - tx      (the crop's x axis reversed, 1-based)
    alpha' = A alpha + b       (the mirrored shape, in the model's own bases)

``A`` and ``b`` solve ``mean + W alpha' = mirror(mean + W alpha)`` in least squares over every
vertex; they are exact when the model's mean is symmetric and its bases are closed under
mirroring (the synthetic head), and close for the Basel Face Model, which is nearly symmetric
(:attr:`MirrorMap.residual` says how close, in model units).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.frame import CROP_SIZE, reflect
from models.morphable import MorphableModel
from models.params import EXPRESSION_SLICE, NUM_EXPRESSION, NUM_POSE, NUM_SHAPE, SHAPE_SLICE

_FLIP_X = np.array([[-1.0], [1.0], [1.0]])


@dataclass(frozen=True)
class MirrorMap:
    """How a model's coefficients transform under a left/right mirror.

    Attributes:
        matrix: (50, 50) maps [alpha_shp, alpha_exp] to the mirrored face's coefficients.
        offset: (50,) the mirrored mean's coefficients (0 for a symmetric mean).
        residual: RMS over vertices of what the bases cannot express of a mirrored face, for
            the mean plus one unit of each basis column (model units; 0 = exact).
    """

    matrix: np.ndarray
    offset: np.ndarray
    residual: float


def mirror_shape(model: MorphableModel, shape: np.ndarray) -> np.ndarray:
    """Mirror an unposed shape (..., 3, N): x negated and every vertex moved to its mirror."""
    if model.mirror_ids is None:
        raise ValueError(
            f"{model.name}: no left/right vertex correspondence (mirror_ids); flip with the "
            "dataset's own _Flip images instead, or give the model a 'mirror' array"
        )
    return shape[..., model.mirror_ids] * _FLIP_X


def mirror_map(model: MorphableModel) -> MirrorMap:
    """Solve the coefficient mirror of ``model`` (see the module docstring)."""
    basis = np.concatenate([model.shape_basis, model.expression_basis], axis=2)  # (3, N, 50)
    flat = basis.reshape(-1, NUM_SHAPE + NUM_EXPRESSION)
    mirrored_basis = np.moveaxis(mirror_shape(model, np.moveaxis(basis, 2, 0)), 0, 2).reshape(flat.shape)
    mirrored_mean = (mirror_shape(model, model.mean) - model.mean).reshape(-1)
    solution, *_ = np.linalg.lstsq(flat, np.column_stack([mirrored_basis, mirrored_mean]), rcond=None)
    matrix, offset = solution[:, :-1], solution[:, -1]
    misfit = flat @ solution - np.column_stack([mirrored_basis, mirrored_mean])
    residual = float(np.sqrt((misfit**2).sum(axis=0).max() / model.num_vertices))
    return MirrorMap(matrix=matrix, offset=offset, residual=residual)


def mirror_params(params: np.ndarray, mapping: MirrorMap, size: int = CROP_SIZE) -> np.ndarray:
    """The 62-d parameter (..., 62) of the horizontally mirrored ``size``-pixel crop."""
    params = np.asarray(params, dtype=np.float64)
    out = params.copy()
    camera = params[..., :NUM_POSE].reshape(*params.shape[:-1], 3, 4)
    flipped = camera.copy()
    flipped[..., :, :3] = _FLIP_X * camera[..., :, :3] * _FLIP_X.T
    flipped[..., 0, 3] = reflect(camera[..., 0, 3], size)
    out[..., :NUM_POSE] = flipped.reshape(*params.shape[:-1], NUM_POSE)
    alphas = np.concatenate([params[..., SHAPE_SLICE], params[..., EXPRESSION_SLICE]], axis=-1)
    mirrored = alphas @ mapping.matrix.T + mapping.offset
    out[..., SHAPE_SLICE] = mirrored[..., :NUM_SHAPE]
    out[..., EXPRESSION_SLICE] = mirrored[..., NUM_SHAPE:]
    return out
