"""The mean head's surface: its radius from CENTRE along each vertex direction.

The radius is a smooth union of convex primitives (skull, face, neck, ears) plus the facial
features as a nose-ridge profile, a lip profile and Gaussian bumps and dents placed in the face
chart, plus a layer of scalp hair; eyes are spheres seen through the lid opening. Between the
inner lips the band of vertices is collapsed onto the mouth line, so the mean mouth is shut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from models.synthetic_face.chart import (
    CENTRE,
    SIDES,
    Vec3,
    chart_from_directions,
    directions_from_chart,
    ellipsoid_exit,
    gauss,
    smax,
    smoothstep,
    sphere_exit,
    superellipsoid_exit,
)
from models.synthetic_face.features import eye_rows, hair_weight, mouth_line, mouth_warp
from models.synthetic_face.mesh import Points, VertexTag


class Primitive(NamedTuple):
    """A convex part of the featureless head."""

    name: str
    centre: Vec3  # model units; of the x > 0 one for a paired primitive
    axes: Vec3  # semi-axes
    powers: Vec3 | None  # superellipsoid exponents; None: an ellipsoid
    taper: float  # the x axis widens by this fraction per y semi-axis of height (superellipsoids)
    blend: float  # smooth-max width joining it to the primitives before it (unused for the first)
    paired: bool  # one either side, x < 0 first


class Bump(NamedTuple):
    """A Gaussian bump (height > 0) or dent (height < 0) of the radius over chart (a, b)."""

    name: str
    centre: tuple[float, float]  # chart (a, b); of the a > 0 one for a paired bump
    sigma: tuple[float, float]
    height: float  # model units
    paired: bool  # one either side, else one on the midline


class LipRidge(NamedTuple):
    """A Gaussian ridge (height > 0) or crease (height < 0) along the mouth line."""

    name: str
    above_line: float  # chart b of its crest above the mouth line
    sigma: float  # in chart b
    height: float


# The featureless head: the smooth maximum of the primitives' exit distances, in this order.
_PRIMITIVES = tuple(Primitive(*row) for row in (
    # name, centre (x, y, z), semi-axes (x, y, z), powers (x, y, z), taper, blend, paired
    ("skull", (0.0, 50000.0, 4000.0), (76000.0, 95000.0, 104000.0), (2.3, 2.2, 2.2), 0.0, 0.0, False),
    ("face", (0.0, -28000.0, 32000.0), (64000.0, 68000.0, 70000.0), (2.4, 2.6, 2.4), 0.25, 14000.0, False),
    ("neck", (0.0, -95000.0, -10000.0), (46000.0, 80000.0, 50000.0), (2.0, 10.0, 2.0), 0.0, 18000.0, False),
    ("ear", (74000.0, 10000.0, -8000.0), (11000.0, 30000.0, 17000.0), None, 0.0, 5000.0, True),
))

# The nose ridge down the midline: height and half-width at chart b, linear in between (height 0
# beyond the ends); across the face it falls off as exp(-(|a| / width)^_NOSE_RIDGE_SHARPNESS).
_NOSE_RIDGE = (
    # b, height, width
    (-24000.0, 0.0, 7000.0),
    (-18500.0, 5000.0, 8000.0),
    (-12000.0, 16000.0, 9000.0),
    (-6000.0, 27000.0, 9200.0),
    (-1000.0, 31000.0, 8600.0),
    (3500.0, 28000.0, 8000.0),
    (11000.0, 20000.0, 7000.0),
    (19000.0, 11500.0, 6000.0),
    (27000.0, 4500.0, 6500.0),
    (36000.0, 0.0, 9000.0),
)
_NOSE_RIDGE_SHARPNESS = 2.6

# Bumps and dents, added group by group; within a group the paired ones go first, all of the
# image-left side (a < 0) then all of the image-right side, then the midline ones in order.
_NOSE_BUMPS = tuple(Bump(*row) for row in (
    # name, centre (a, b), sigma (a, b), height, paired
    ("nostril_wing", (11500.0, -17500.0), (5000.0, 4200.0), 9000.0, True),
))
_UPPER_FACE_BUMPS = tuple(Bump(*row) for row in (
    ("brow_ridge", (30000.0, 40000.0), (17000.0, 6500.0), 5500.0, True),
    ("eye_socket", (31000.0, 26000.0), (14000.0, 9500.0), -8000.0, True),
    ("cheekbone", (46000.0, 4000.0), (13000.0, 10000.0), 4500.0, True),
    ("glabella", (0.0, 36000.0), (9000.0, 7000.0), 3000.0, False),
))
_LOWER_FACE_BUMPS = tuple(Bump(*row) for row in (
    ("philtrum", (0.0, -30000.0), (9000.0, 6000.0), 3500.0, False),  # the upper lip's base
    ("chin", (0.0, -80000.0), (16000.0, 10000.0), 12000.0, False),
    ("chin_dent", (0.0, -61000.0), (14000.0, 3500.0), -2500.0, False),  # the fold above the chin
))

# The lips: ridges along the mouth line, fading out across the face as exp(-(|a| / width)^power).
_LIP_RIDGES = tuple(LipRidge(*row) for row in (
    # name, b above the mouth line, sigma, height
    ("upper_lip", 3600.0, 3400.0, 5200.0),
    ("lower_lip", -4800.0, 3800.0, 5600.0),
    ("crease", 0.0, 1100.0, -2200.0),  # where the lips meet
))
_LIP_WIDTH = 23000.0
_LIP_EDGE_POWER = 4

_FEATURE_FADE = (20000.0, 60000.0)  # chart depth over which the features fade in toward the face
_HAIR_THICKNESS = 3000.0  # the scalp hair layer, model units

# Eyes: the image-left eyeball (the other is its mirror), and the lids around the opening.
_EYEBALL_CENTRE = np.array([-30500.0, 25500.0, 80500.0])
_EYEBALL_RADIUS = 16500.0
_LID_CLEARANCE = 800.0  # the lids stand this far outside the eyeball at the opening ...
_LID_SLOPE = 0.3  # ... and recede toward it by this much per chart unit away from the opening
_LID_REACH = 30000.0  # chart distance from the opening within which the eyeball shapes the lids
_LID_BLEND = 2500.0  # smooth-max width joining the lids to the face


@dataclass(frozen=True)
class MeanSurface:
    """The mean head's vertices and what the later stages need to know about each (N vertices)."""

    positions: np.ndarray  # (N, 3) model units
    dirs: np.ndarray  # (N, 3) sampled unit directions from CENTRE (before the mouth warp)
    tags: np.ndarray  # (N,) VertexTag
    extra: np.ndarray  # (N,) per-tag number (see mesh.Points)
    a: np.ndarray  # (N,) chart a
    b: np.ndarray  # (N,) chart b before the mouth warp
    depth: np.ndarray  # (N,) chart z of the direction (0 where its ray misses the chart)
    rows: dict[str, np.ndarray]  # vertex ids of the feature rows by name


def mean_surface(points: Points, rows: dict[str, np.ndarray]) -> MeanSurface:
    """Place the sampled directions on the mean surface."""
    dirs, tags, feat_a, feat_b, extra = points.arrays()
    a, b, depth = chart_from_directions(dirs)
    exact = ~np.isnan(feat_a)
    a[exact], b[exact] = feat_a[exact], feat_b[exact]
    warped = mouth_warp(a, b)
    in_band = (tags == VertexTag.MOUTH_BAND) | (tags == VertexTag.MOUTH_CORNER)
    warped[in_band] = mouth_line(a[in_band])  # exactly on the line, so the band is flat
    moved = (warped != b) & (depth > 0)
    surface_dirs = dirs.copy()
    surface_dirs[moved] = directions_from_chart(a[moved], warped[moved])
    radius = (head_radius(surface_dirs) + feature_offset(a, warped, depth)
              + _HAIR_THICKNESS * hair_weight(surface_dirs))
    _add_eyes(radius, surface_dirs, tags, a, b, depth)
    positions = CENTRE + radius[:, None] * surface_dirs
    return MeanSurface(positions, dirs, tags, extra, a, b, depth, rows)


def head_radius(dirs: np.ndarray) -> np.ndarray:
    """Distance (N,) from CENTRE to the featureless head along directions (N, 3)."""
    first, *others = _PRIMITIVES
    radius = _exit_distance(dirs, first, first.centre)
    for primitive in others:
        x, y, z = primitive.centre
        for centre in [(side * x, y, z) for side in SIDES] if primitive.paired else [primitive.centre]:
            radius = smax(radius, _exit_distance(dirs, primitive, centre), primitive.blend)
    return radius


def _exit_distance(dirs: np.ndarray, primitive: Primitive, centre: Vec3) -> np.ndarray:
    if primitive.powers is None:
        return ellipsoid_exit(dirs, np.asarray(centre), np.asarray(primitive.axes))
    return superellipsoid_exit(dirs, centre, primitive.axes, primitive.powers, primitive.taper)


def feature_offset(a: np.ndarray, b: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Radial offset (N,) of the facial features at chart points (a, b) (after the mouth warp)."""
    front = smoothstep(depth, *_FEATURE_FADE)
    ab = np.stack([a, b])
    offset = np.zeros_like(a)
    offset += _nose_ridge(a, b)
    _add_bumps(offset, ab, _NOSE_BUMPS)
    _add_bumps(offset, ab, _UPPER_FACE_BUMPS)
    offset += _lips(a, b)
    _add_bumps(offset, ab, _LOWER_FACE_BUMPS)
    return offset * front


def _nose_ridge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ridge_b, ridge_height, ridge_width = zip(*_NOSE_RIDGE, strict=True)
    height = np.interp(b, ridge_b, ridge_height, left=0.0, right=0.0)
    width = np.interp(b, ridge_b, ridge_width)
    return height * np.exp(-((np.abs(a) / width) ** _NOSE_RIDGE_SHARPNESS))


def _add_bumps(offset: np.ndarray, ab: np.ndarray, bumps: tuple[Bump, ...]) -> None:
    """Add a group of bumps to ``offset`` (N,) in place, at chart points ``ab`` (2, N)."""
    for side in SIDES:
        for bump in (bump for bump in bumps if bump.paired):
            offset += bump.height * gauss(ab, (side * bump.centre[0], bump.centre[1]), bump.sigma)
    for bump in (bump for bump in bumps if not bump.paired):
        offset += bump.height * gauss(ab, bump.centre, bump.sigma)


def _lips(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    line = mouth_line(a)
    across = np.exp(-((np.abs(a) / _LIP_WIDTH) ** _LIP_EDGE_POWER))
    profile = np.zeros_like(a)
    for ridge in _LIP_RIDGES:
        profile += ridge.height * np.exp(-0.5 * ((b - line - ridge.above_line) / ridge.sigma) ** 2)
    return across * profile


def _eyeball_centre(side: float) -> np.ndarray:
    """Centre (3,) of one eyeball (side -1: x < 0), model units."""
    return _EYEBALL_CENTRE * np.array([-side, 1.0, 1.0])


def _eye_distance(a: np.ndarray, b: np.ndarray, side: float) -> np.ndarray:
    """Approximate chart distance (N,) from the lid opening of one eye (0 inside)."""
    rows = eye_rows(side)
    order = np.argsort(rows["a"])
    ea, lower, upper = rows["a"][order], rows["lower"][order], rows["upper"][order]
    clamped = np.clip(a, ea[0], ea[-1])
    da = np.abs(a - clamped)
    db = (np.maximum(b - np.interp(clamped, ea, upper), 0.0)
          + np.maximum(np.interp(clamped, ea, lower) - b, 0.0))
    return np.hypot(da, db)


def _add_eyes(radius: np.ndarray, dirs: np.ndarray, tags: np.ndarray, a: np.ndarray, b: np.ndarray,
              depth: np.ndarray) -> None:
    """Shape the lids over each eyeball and put the opening's vertices on it (``radius`` in place)."""
    opening = tags == VertexTag.EYE_INNER
    for side in SIDES:
        centre = _eyeball_centre(side)
        this_side = (a * side > 0) & (depth > 0)
        distance = _eye_distance(a, b, side)
        near = this_side & (distance < _LID_REACH)
        lid = sphere_exit(dirs[near], centre, _EYEBALL_RADIUS + _LID_CLEARANCE - _LID_SLOPE * distance[near])
        radius[near] = smax(radius[near], lid, _LID_BLEND)
        inside = opening & this_side
        radius[inside] = sphere_exit(dirs[inside], centre, np.full(inside.sum(), _EYEBALL_RADIUS))
