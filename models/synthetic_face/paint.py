"""Per-vertex regions and colours of the synthetic head.

Regions (``vertex_region``, int8): 0 SKIN, 1 LIPS, 2 EYEBROW, 3 SCLERA, 4 IRIS, 5 PUPIL, 6 HAIR
(scalp), 7 MOUTH_INTERIOR, 8 NOSTRIL, 9 LASH (upper lid margin). The albedo is kept as three parts
that sum to it, skin-toned (SKIN, LIPS, NOSTRIL), hair-toned (HAIR, EYEBROW) and fixed (eyes,
lashes, mouth interior), so a face can be recoloured for another skin tone and hair colour.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from models.synthetic_face.chart import SIDES, gauss, smoothstep
from models.synthetic_face.features import (
    EYE_FRACTIONS,
    MOUTH_OUTER,
    brow_curve,
    eye_rows,
    hair_weight,
    lower_lip_height,
    mouth_line,
    upper_lip_height,
)
from models.synthetic_face.mesh import VertexTag
from models.synthetic_face.surface import MeanSurface

REGION_NAMES: tuple[str, ...] = (
    "skin", "lips", "eyebrow", "sclera", "iris", "pupil", "hair", "mouth_interior", "nostril",
    "lash",
)
SKIN, LIPS, EYEBROW, SCLERA, IRIS, PUPIL, HAIR, MOUTH_INTERIOR, NOSTRIL, LASH = range(len(REGION_NAMES))

# Neutral albedos, BGR in [0, 1].
NEUTRAL_SKIN = np.array([0.47, 0.58, 0.78])
NEUTRAL_HAIR = np.array([0.08, 0.11, 0.15])
_LIPS = np.array([0.36, 0.34, 0.64])
_BROW = np.array([0.10, 0.14, 0.20])
_SCLERA = np.array([0.86, 0.88, 0.90])
_IRIS = np.array([0.13, 0.25, 0.36])
_PUPIL = np.array([0.03, 0.03, 0.03])
_MOUTH = np.array([0.07, 0.07, 0.30])
_NOSTRIL = np.array([0.14, 0.18, 0.30])
_LASH = np.array([0.07, 0.08, 0.10])

_SKIN_PART, _HAIR_PART, _FIXED_PART = 0, 1, 2  # the albedo parts, in ``albedo_parts`` order
_MOTTLING_SEED = 7  # seed of the per-vertex brightness noise
_SKIN_MOTTLING = 0.012  # its relative standard deviation over the skin ...
_HAIR_MOTTLING = 0.12  # ... and over the hair
_FACE_DEPTH = 30000.0  # chart depth beyond which a vertex is on the face
_MEMBERSHIP = 0.5  # a vertex is in a region where that region's weight is above this
_BROW_OPACITY = 0.9
_BROW_EDGE_POWER = 2.5  # eyebrow weight across it: exp(-|offset / half-thickness|^power)
_BROW_START = (-2500.0, 1500.0)  # a brow fades in over this chart-a range about its smallest a ...
_BROW_END = (-1500.0, 1500.0)  # ... and out over this one about its largest a
_LIP_BORDER_OPACITY = 0.6  # the vermilion border vertices: partly lip, partly skin
_LIP_BORDER_SLACK = 1.0  # chart units: vertices this close outside the border still count as lip
_LIPS_MEET = 0.75  # lip colour scale along the line where the lips meet, darker
_NOSTRIL_CENTRE = (6500.0, -20500.0)  # (x, y) of the image-right nostril patch, model units
_NOSTRIL_HALF_AXES = (4200.0, 2600.0)
_NOSTRIL_FRONT = 95000.0  # the patch only holds vertices in front of this z ...
_NOSTRIL_FACING_DOWN = -0.35  # ... whose normal's y is below this
_IRIS_RADIUS = 5600.0  # chart units, about the iris centre
_PUPIL_RADIUS = 2200.0
_IRIS_RAISE = 600.0  # iris centre above the middle of the lid opening, chart units
_SCLERA_SHADING = 0.25  # the sclera darkens by this much toward the corners ...
_SCLERA_SHADED = (0.5, 1.0)  # ... over this range of |a - middle| / half-width
_LOWER_LID_TINT = np.array([0.85, 0.82, 0.95])  # skin colour scale of the lower lid margin
_EYE_CORNER_TINT = np.array([0.75, 0.72, 0.92])  # ... of the eye corners


class Tint(NamedTuple):
    """A paired Gaussian change of skin colour: ``skin *= 1 - strength * weight * channels``."""

    name: str
    centre: tuple[float, float]  # chart (a, b) of the a > 0 one
    sigma: tuple[float, float]
    strength: float
    channels: tuple[float, float, float]  # BGR


_SKIN_TINTS = tuple(Tint(*row) for row in (
    # name, centre (a, b), sigma (a, b), strength, channels (B, G, R)
    ("flushed_cheeks", (40000.0, -15000.0), (14000.0, 14000.0), 0.06, (1.0, 1.0, -0.3)),
    ("eye_shadow", (31000.0, 26000.0), (12000.0, 8000.0), 0.08, (1.0, 1.0, 1.0)),
))


class _Paint:
    """Per-vertex albedo kept as three parts, ``skin + hair + fixed``, so it can be recoloured."""

    def __init__(self, n: int) -> None:
        self.parts = np.zeros((3, n, 3))  # skin-toned, hair-toned, fixed (eyes, mouth, lashes)

    def blend(self, weight: np.ndarray, colour: np.ndarray | float, part: int) -> None:
        """Paint ``colour`` over everything with per-vertex opacity ``weight`` (N,)."""
        self.parts *= 1.0 - weight[None, :, None]
        self.parts[part] += weight[:, None] * colour

    def set(self, ids: np.ndarray, colour: np.ndarray | float, part: int) -> None:
        self.parts[:, ids] = 0.0
        self.parts[part, ids] = colour


def regions_and_albedo(surface: MeanSurface, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Region ids (N,) int8 and albedo parts (3, N, 3) float32: skin-toned, hair-toned, fixed; BGR.

    Args:
        surface: the mean head.
        normals: (3, N) unit vertex normals of the mean head.
    """
    n = len(surface.positions)
    region = np.full(n, SKIN, dtype=np.int8)
    rng = np.random.default_rng(_MOTTLING_SEED)
    paint = _Paint(n)
    face = surface.depth > _FACE_DEPTH
    paint.parts[_SKIN_PART] = _skin(surface, face, rng)
    hair = hair_weight(surface.dirs)
    paint.blend(hair, 0.0, _HAIR_PART)
    paint.parts[_HAIR_PART] += hair[:, None] * NEUTRAL_HAIR * (1.0 + rng.normal(0.0, _HAIR_MOTTLING, (n, 1)))
    region[hair > _MEMBERSHIP] = HAIR
    brow = _brow_weight(surface.a, surface.b, surface.depth) * (1.0 - hair)
    paint.blend(_BROW_OPACITY * brow, _BROW, _HAIR_PART)
    region[brow > _MEMBERSHIP] = EYEBROW
    _paint_lips(paint, region, surface, face)
    _paint_nostrils(paint, region, surface.positions, normals)
    for side in SIDES:
        _paint_eye(paint, region, surface, side)
    return region, np.clip(paint.parts, 0.0, 1.0).astype(np.float32)


def _skin(surface: MeanSurface, face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Skin colour (N, 3): redder cheeks, darker around the eyes, a little mottling."""
    ab = np.stack([surface.a, surface.b])
    skin = np.tile(NEUTRAL_SKIN, (len(ab[0]), 1))
    for tint in _SKIN_TINTS:
        weight = sum(gauss(ab, (side * tint.centre[0], tint.centre[1]), tint.sigma) for side in SIDES)
        skin *= 1.0 - tint.strength * (weight * face)[:, None] * np.array(tint.channels)
    skin *= 1.0 + rng.normal(0.0, _SKIN_MOTTLING, (len(skin), 1))
    return skin


def _brow_weight(a: np.ndarray, b: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Soft eyebrow membership (N,) from chart coordinates."""
    weight = np.zeros_like(a)
    for side in SIDES:
        ba, bb, thick = brow_curve(side)
        order = np.argsort(ba)
        ba, bb, thick = ba[order], bb[order], thick[order]
        centre = np.interp(a, ba, bb)
        half = np.interp(a, ba, thick)
        along = smoothstep(a, ba[0] + _BROW_START[0], ba[0] + _BROW_START[1])
        along *= 1.0 - smoothstep(a, ba[-1] + _BROW_END[0], ba[-1] + _BROW_END[1])
        weight = np.maximum(weight, along * np.exp(-(np.abs((b - centre) / half) ** _BROW_EDGE_POWER)))
    return weight * (depth > _FACE_DEPTH)


def _paint_lips(paint: _Paint, region: np.ndarray, surface: MeanSurface, face: np.ndarray) -> None:
    """Lips inside the vermilion borders (pre-warp chart), the borders partly blended; the mouth
    interior in the band between the inner lips, and a darker line where the lips meet."""
    a, b, tags, extra = surface.a, surface.b, surface.tags, surface.extra
    inside_lips = (
        (np.abs(a) < MOUTH_OUTER)
        & (b <= mouth_line(a) + upper_lip_height(a) + _LIP_BORDER_SLACK)
        & (b >= mouth_line(a) - lower_lip_height(a) - _LIP_BORDER_SLACK)
        & face
    )
    lip_weight = np.where(inside_lips, 1.0, 0.0)
    lip_weight[tags == VertexTag.LIP_BORDER] = _LIP_BORDER_OPACITY
    paint.blend(lip_weight, _LIPS, _SKIN_PART)
    region[lip_weight > _MEMBERSHIP] = LIPS
    band = tags == VertexTag.MOUTH_BAND
    interior = np.flatnonzero(band & (extra > 0.0) & (extra < 1.0))
    paint.set(interior, _MOUTH, _FIXED_PART)
    region[interior] = MOUTH_INTERIOR
    inner_edge = band & ((extra == 0.0) | (extra == 1.0))
    inner_edge = np.flatnonzero(inner_edge | (tags == VertexTag.MOUTH_CORNER))
    paint.set(inner_edge, _LIPS * _LIPS_MEET, _SKIN_PART)
    region[inner_edge] = LIPS


def _paint_nostrils(paint: _Paint, region: np.ndarray, positions: np.ndarray, normals: np.ndarray) -> None:
    """Down-facing patches either side of the columella."""
    x, y, z = positions.T
    (centre_x, centre_y), (half_x, half_y) = _NOSTRIL_CENTRE, _NOSTRIL_HALF_AXES
    for side in SIDES:
        patch = ((x - side * centre_x) / half_x) ** 2 + ((y - centre_y) / half_y) ** 2 < 1.0
        patch = np.flatnonzero(patch & (z > _NOSTRIL_FRONT) & (normals[1] < _NOSTRIL_FACING_DOWN))
        paint.set(patch, 0.5 * (_NOSTRIL + NEUTRAL_SKIN), _SKIN_PART)
        region[patch] = NOSTRIL


def _paint_eye(paint: _Paint, region: np.ndarray, surface: MeanSurface, side: float) -> None:
    """Sclera (darker toward the corners), iris and pupil; lash line on the upper margin."""
    key = "eye_left" if side < 0 else "eye_right"
    rows, a, b = surface.rows, surface.a, surface.b
    eye = eye_rows(side)
    order = np.argsort(eye["a"])
    mid_a = 0.5 * (eye["a"][0] + eye["a"][-1])
    half_width = 0.5 * abs(eye["a"][0] - eye["a"][-1])
    centre_b = _IRIS_RAISE + 0.5 * (np.interp(mid_a, eye["a"][order], eye["lower"][order])
                                    + np.interp(mid_a, eye["a"][order], eye["upper"][order]))
    ids = np.concatenate([rows[f"{key}_{f}"] for f in EYE_FRACTIONS])
    r = np.hypot(a[ids] - mid_a, b[ids] - centre_b)
    shade = 1.0 - _SCLERA_SHADING * smoothstep(np.abs(a[ids] - mid_a) / half_width, *_SCLERA_SHADED)
    paint.set(ids, 0.0, _FIXED_PART)
    paint.parts[_FIXED_PART, ids] = _SCLERA * shade[:, None]
    region[ids] = SCLERA
    for radius, colour, region_id in ((_IRIS_RADIUS, _IRIS, IRIS), (_PUPIL_RADIUS, _PUPIL, PUPIL)):
        paint.set(ids[r < radius], colour, _FIXED_PART)
        region[ids[r < radius]] = region_id
    paint.set(rows[key + "_upper"], _LASH, _FIXED_PART)
    region[rows[key + "_upper"]] = LASH
    paint.set(rows[key + "_lower"], NEUTRAL_SKIN * _LOWER_LID_TINT, _SKIN_PART)
    paint.set(rows[key + "_corners"], NEUTRAL_SKIN * _EYE_CORNER_TINT, _SKIN_PART)
