"""The synthetic head: its morphable model, coefficient priors and colours, and how it is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from models.morphable import MorphableModel
from models.params import NUM_EXPRESSION, NUM_SHAPE
from models.synthetic_face import paint
from models.synthetic_face.bases import EXPRESSION_NAMES, expression_basis, identity_basis, vertex_mirror_ids
from models.synthetic_face.landmarks import landmark_ids
from models.synthetic_face.mesh import sample_points, triangulate, vertex_normals
from models.synthetic_face.surface import mean_surface


@dataclass(frozen=True, eq=False)
class SyntheticHead:
    """The procedural head: morphable model, coefficient priors and per-vertex colours.

    Attributes:
        model: ``MorphableModel`` named ``synthetic-head`` with triangles.
        shape_std: (40,) prior standard deviation of each identity coefficient (Shape_Para units).
        expression_std: (10,) prior standard deviation of each expression coefficient.
        vertex_albedo: (N, 3) float32 BGR in [0, 1], a neutral mid skin tone with dark hair.
        vertex_region: (N,) int8 region ids (the class constants below).
        expression_names: the 10 expression mode names, in coefficient order.
        albedo_parts: (3, N, 3) float32, ``vertex_albedo`` split into its skin-toned, hair-toned
            and fixed (eyes, mouth, lashes) parts, which sum to it; :meth:`colours` rescales the
            first two.
    """

    model: MorphableModel
    shape_std: np.ndarray
    expression_std: np.ndarray
    vertex_albedo: np.ndarray
    vertex_region: np.ndarray
    albedo_parts: np.ndarray
    expression_names: tuple[str, ...] = EXPRESSION_NAMES

    SKIN: ClassVar[int] = paint.SKIN
    LIPS: ClassVar[int] = paint.LIPS
    EYEBROW: ClassVar[int] = paint.EYEBROW
    SCLERA: ClassVar[int] = paint.SCLERA
    IRIS: ClassVar[int] = paint.IRIS
    PUPIL: ClassVar[int] = paint.PUPIL
    HAIR: ClassVar[int] = paint.HAIR
    MOUTH_INTERIOR: ClassVar[int] = paint.MOUTH_INTERIOR
    NOSTRIL: ClassVar[int] = paint.NOSTRIL
    LASH: ClassVar[int] = paint.LASH
    NEUTRAL_SKIN_BGR: ClassVar[tuple[float, ...]] = tuple(float(c) for c in paint.NEUTRAL_SKIN)
    NEUTRAL_HAIR_BGR: ClassVar[tuple[float, ...]] = tuple(float(c) for c in paint.NEUTRAL_HAIR)

    def colours(self, skin_bgr: np.ndarray, hair_bgr: np.ndarray) -> np.ndarray:
        """Per-vertex albedo recoloured for a skin tone and a hair colour.

        The skin-toned part of every vertex's albedo (skin, lips, nostrils, and the skin share of
        blended vertices) is scaled per channel by ``skin / neutral skin``, the hair-toned part
        (scalp hair, eyebrows) by ``hair / neutral hair``, so the variation inside a region is
        kept; eyes, lashes and mouth interior are unchanged.

        Args:
            skin_bgr: (3,) BGR in [0, 1].
            hair_bgr: (3,) BGR in [0, 1].
        Returns:
            (N, 3) float32 BGR in [0, 1].
        """
        skin = _colour_argument("skin_bgr", skin_bgr)
        hair = _colour_argument("hair_bgr", hair_bgr)
        skin_part, hair_part, fixed_part = self.albedo_parts
        out = skin_part * (skin / paint.NEUTRAL_SKIN) + hair_part * (hair / paint.NEUTRAL_HAIR) + fixed_part
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def landmark_facing_camera(self, vertices: np.ndarray) -> np.ndarray:
        """Whether each landmark's surface faces the camera, from posed vertices.

        Args:
            vertices: (3, N) posed vertices in image coordinates, as the renderer takes them:
                x right, y down (row), z toward the camera; any units.
        Returns:
            (68,) bool: True where the landmark's vertex normal points toward the camera (a
            landmark can face the camera and still be hidden behind the nose).
        """
        vertices = np.asarray(vertices, dtype=np.float64)
        if vertices.shape != self.model.mean.shape:
            expected = self.model.mean.shape
            raise ValueError(f"vertices must have shape {expected}, got {vertices.shape}")
        up = vertices * np.array([[1.0], [-1.0], [1.0]])
        normals = vertex_normals(up, self.model.triangles)
        return normals[2, self.model.landmark_indices] > 0.0


def _colour_argument(name: str, value: np.ndarray) -> np.ndarray:
    colour = np.asarray(value, dtype=np.float64).reshape(-1)
    if colour.shape != (3,) or not np.all(np.isfinite(colour)) or np.any(colour < 0):
        raise ValueError(f"{name} must be 3 finite BGR values >= 0, got {value!r}")
    return colour


def build_synthetic_head() -> SyntheticHead:
    """Build the procedural head (deterministic, well under a second).

    Returns:
        A :class:`SyntheticHead` whose model has 5802 vertices and 11600 triangles.
    """
    points, rows = sample_points()
    triangles = triangulate(points.arrays()[0])
    surface = mean_surface(points, rows)
    mean = surface.positions.T  # (3, N)
    region, parts = paint.regions_and_albedo(surface, vertex_normals(mean, triangles))
    albedo = np.clip(parts.sum(axis=0), 0.0, 1.0)
    shape_basis, shape_std = identity_basis(mean)
    expression, expression_std = expression_basis(surface)
    model = MorphableModel(
        name="synthetic-head",
        mean=mean,
        shape_basis=shape_basis,
        expression_basis=expression,
        landmark_indices=landmark_ids(surface.positions, rows),
        triangles=triangles,
        mirror_ids=vertex_mirror_ids(mean, expression),
    )
    _check_rank("shape", shape_basis, NUM_SHAPE)
    _check_rank("expression", expression, NUM_EXPRESSION)
    for array in (shape_std, expression_std, albedo, region, parts):
        array.setflags(write=False)
    return SyntheticHead(
        model=model,
        shape_std=shape_std,
        expression_std=expression_std,
        vertex_albedo=albedo,
        vertex_region=region,
        albedo_parts=parts,
    )


def _check_rank(name: str, basis: np.ndarray, k: int) -> None:
    rank = np.linalg.matrix_rank(basis.reshape(-1, k))
    if rank != k:
        raise RuntimeError(f"synthetic {name} basis has rank {rank}, expected {k}")
