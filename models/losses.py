"""Training losses on the whitened 62-d parameter: WPDC, Wing on 3D vertices, and their sum.

* WPDC (weighted parameter distance cost, 3DDFA): squared whitened-parameter errors, each weighted
  by how much the vertex positions would move if that parameter alone were corrected. The
  weights are computed on detached values, over the 68 landmark vertices plus 132 vertices drawn
  at random each batch (a keypoint-only model uses its 68 alone); M = vertices used.
* Wing (Feng et al. 2018) on the reconstructed 3D vertices of the same vertex set, in the
  parameter's frame (crop pixels): ``omega ln(1 + |x| / epsilon)`` for ``|x| < omega``, else
  ``|x| - C`` with ``C = omega - omega ln(1 + omega / epsilon)``; mean over vertices, coordinates
  and batch.
* Mobile-FRNet's loss: ``lambda1 * WPDC + lambda2 * Wing``.

Inputs are whitened parameters (B, 62); a :class:`~models.params.ParamStats` de-whitens them
and a :class:`~models.morphable.MorphableModel` supplies the vertices.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from models.morphable import MorphableModel
from models.params import EXPRESSION_SLICE, NUM_PARAMS, SHAPE_SLICE, ParamStats

NUM_RESAMPLED = 132  # 3DDFA: 68 keypoints + 132 random vertices = 200
# 3DDFA's scale of the shape/expression weights relative to the pose weights (wpdc_loss.py).
SHAPE_WEIGHT_SCALE = 0.00057339936
WEIGHT_EPS = 1e-6
# Indices of f*R in the 62-d parameter, by the vertex coordinate each one multiplies.
ROTATION_INDICES_BY_AXIS = ((0, 4, 8), (1, 5, 9), (2, 6, 10))
TRANSLATION_XY_INDICES = (3, 7)
TRANSLATION_Z_INDEX = 11  # tz: no effect on the 2D projection, weight 0
WING_OMEGA = 10.0  # Feng et al.'s defaults, in pixels
WING_EPSILON = 2.0


class LossParts(NamedTuple):
    """A loss value and its terms (scalars)."""

    total: torch.Tensor
    wpdc: torch.Tensor
    wing: torch.Tensor


def sample_vertex_ids(model: MorphableModel, generator: torch.Generator,
                      num_resampled: int = NUM_RESAMPLED) -> np.ndarray:
    """The 68 landmark vertices plus ``num_resampled`` drawn at random (without replacement).

    A keypoint-only model (``not model.is_dense``) gives its 68 landmarks alone; a model with
    fewer vertices than ``num_resampled`` gives all of them after the landmarks.
    Returns (M,) int64 vertex ids.
    """
    if num_resampled < 0:
        raise ValueError(f"num_resampled must be >= 0, got {num_resampled}")
    if not model.is_dense or num_resampled == 0:
        return model.landmark_indices.copy()
    drawn = torch.randperm(model.num_vertices, generator=generator)[:num_resampled]
    return np.concatenate([model.landmark_indices, drawn.numpy().astype(np.int64)])


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.ndim != 2 or pred.shape[1] != NUM_PARAMS or pred.shape != target.shape:
        raise ValueError(f"expected prediction and target of shape (B, {NUM_PARAMS}), got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")


def dewhiten(whitened: torch.Tensor, stats: ParamStats) -> torch.Tensor:
    """``x * std + mean`` for a tensor (..., 62), in its dtype and device."""
    mean = torch.tensor(stats.mean, dtype=whitened.dtype, device=whitened.device)
    std = torch.tensor(stats.std, dtype=whitened.dtype, device=whitened.device)
    return whitened * std + mean


def wpdc_weights(pred: torch.Tensor, target: torch.Tensor, stats: ParamStats,
                 model: MorphableModel, vertex_ids: np.ndarray) -> torch.Tensor:
    """3DDFA's WPDC weights (B, 62) for whitened ``pred`` and ``target`` (B, 62), no gradient.

    ``w_i = |dp_i| * ||S_x||`` (i = 0, 4, 8), ``* ||S_y||`` (1, 5, 9), ``* ||S_z||`` (2, 6, 10) with
    S the target's unrotated shape at the M vertices; ``w_i = |dp_i| sqrt(M)`` (i = 3, 7);
    ``w_j = 0.00057339936 |dalpha_j| ||column j of [W_shp W_exp]||``; then ``+ 1e-6``, each row
    divided by its maximum, and ``w_11 = 0``. dp are differences of de-whitened parameters.
    """
    _check_pair(pred, target)
    vertex_ids = np.asarray(vertex_ids, dtype=np.int64)
    with torch.no_grad():
        pred_params = dewhiten(pred.detach(), stats)
        target_params = dewhiten(target.detach(), stats)
        difference = (pred_params - target_params).abs()  # (B, 62)
        shape_norms = model.shapes(target_params, vertex_ids).norm(dim=-1)  # (B, 3)
        weights = torch.zeros_like(difference)
        for axis, indices in enumerate(ROTATION_INDICES_BY_AXIS):
            columns = list(indices)
            weights[:, columns] = difference[:, columns] * shape_norms[:, axis, None]
        translation = list(TRANSLATION_XY_INDICES)
        weights[:, translation] = difference[:, translation] * np.sqrt(len(vertex_ids))
        basis = np.concatenate([model.shape_basis[:, vertex_ids],
                                model.expression_basis[:, vertex_ids]], axis=-1)  # (3, M, 50)
        column_norms = torch.as_tensor(np.sqrt((basis**2).sum(axis=(0, 1))),
                                       dtype=difference.dtype, device=difference.device)  # (50,)
        alphas = slice(SHAPE_SLICE.start, EXPRESSION_SLICE.stop)
        weights[:, alphas] = SHAPE_WEIGHT_SCALE * difference[:, alphas] * column_norms
        weights = weights + WEIGHT_EPS
        weights = weights / weights.max(dim=1, keepdim=True).values
        weights[:, TRANSLATION_Z_INDEX] = 0.0
    return weights


def wpdc_loss(pred: torch.Tensor, target: torch.Tensor, stats: ParamStats,
              model: MorphableModel, vertex_ids: np.ndarray) -> torch.Tensor:
    """``mean(w * (pred - target)^2)`` over batch and the 62 whitened dimensions (scalar)."""
    weights = wpdc_weights(pred, target, stats, model, vertex_ids)
    return (weights * (pred - target) ** 2).mean()


def wing(x: torch.Tensor, omega: float = WING_OMEGA, epsilon: float = WING_EPSILON) -> torch.Tensor:
    """Elementwise Wing function of errors ``x`` (any shape, same units as omega)."""
    if omega <= 0 or epsilon <= 0:
        raise ValueError(f"Wing needs omega > 0 and epsilon > 0, got {omega} and {epsilon}")
    magnitude = x.abs()
    offset = omega - omega * float(np.log1p(omega / epsilon))  # C: joins the pieces at omega
    return torch.where(magnitude < omega, omega * torch.log1p(magnitude / epsilon),
                       magnitude - offset)


def wing_vertex_loss(pred: torch.Tensor, target: torch.Tensor, stats: ParamStats,
                     model: MorphableModel, vertex_ids: np.ndarray,
                     omega: float = WING_OMEGA, epsilon: float = WING_EPSILON) -> torch.Tensor:
    """Wing on the posed vertices (B, 3, M) of de-whitened ``pred`` vs ``target``; mean (scalar)."""
    _check_pair(pred, target)
    pred_vertices = model.vertices(dewhiten(pred, stats), vertex_ids)  # (B, 3, M)
    with torch.no_grad():
        target_vertices = model.vertices(dewhiten(target.detach(), stats), vertex_ids)
    return wing(pred_vertices - target_vertices, omega, epsilon).mean()


class FRNetLoss:
    """Mobile-FRNet's ``lambda1 * WPDC + lambda2 * Wing``, both over one vertex sample a batch.

    Args:
        lambda1, lambda2: weights of the WPDC and Wing terms (>= 0).
        omega, epsilon: Wing's parameters, in the parameter frame's units (crop pixels).
        stats: whitening statistics of the parameter.
        model: the morphable model the vertices come from (dense or keypoint-only).
        num_resampled: random vertices added to the 68 landmarks per batch (dense models).
    """

    def __init__(self, lambda1: float, lambda2: float, stats: ParamStats, model: MorphableModel,
                 omega: float = WING_OMEGA, epsilon: float = WING_EPSILON,
                 num_resampled: int = NUM_RESAMPLED) -> None:
        if lambda1 < 0 or lambda2 < 0:
            raise ValueError(f"loss weights must be >= 0, got lambda1={lambda1}, lambda2={lambda2}")
        if omega <= 0 or epsilon <= 0:
            raise ValueError(f"Wing needs omega > 0 and epsilon > 0, got {omega} and {epsilon}")
        if num_resampled < 0:
            raise ValueError(f"num_resampled must be >= 0, got {num_resampled}")
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.omega = omega
        self.epsilon = epsilon
        self.stats = stats
        self.model = model
        self.num_resampled = num_resampled

    def __call__(self, pred: torch.Tensor, target: torch.Tensor,
                 generator: torch.Generator) -> LossParts:
        """Loss of whitened ``pred`` vs ``target`` (B, 62); vertices drawn with ``generator``."""
        vertex_ids = sample_vertex_ids(self.model, generator, self.num_resampled)
        wpdc = wpdc_loss(pred, target, self.stats, self.model, vertex_ids)
        wing_term = wing_vertex_loss(pred, target, self.stats, self.model, vertex_ids,
                                     self.omega, self.epsilon)
        return LossParts(self.lambda1 * wpdc + self.lambda2 * wing_term, wpdc, wing_term)
