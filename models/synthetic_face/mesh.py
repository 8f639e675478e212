"""Vertex directions of the head and their triangulation.

Directions are sampled densely over the face (~2.4 mm apart), every other one over the sides and
coarsely over the back, with explicit rows of vertices along the eyelid margins, inside the lid
opening and along the lips; the triangles are the convex hull of the directions (a spherical
Delaunay triangulation): a closed mesh, counter-clockwise seen from outside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from scipy.spatial import ConvexHull, cKDTree

from models.synthetic_face.chart import SIDES, chart_from_directions, direction, directions_from_chart
from models.synthetic_face.features import (
    BAND_FRACTIONS,
    EYE_FRACTIONS,
    MOUTH_INNER,
    MOUTH_OUTER,
    MOUTH_SAMPLES,
    eye_rows,
    lower_lip_height,
    mouth_gap,
    mouth_line,
    upper_lip_height,
)

_LATTICE_STEP = 0.024  # radians between neighbouring face vertices (~2.4 mm at the face)
_COARSE_STEP = 4.0 * _LATTICE_STEP  # radians between the vertices over the back of the head
_EYE_RING_ABOVE = 2300.0  # chart distance of the skin row above the upper lid margin
_EYE_RING_BELOW = 2100.0  # ... below the lower lid margin
_EYE_RING_BEYOND = 2300.0  # ... beyond each eye corner
_LIP_SKIN_ABOVE = 2200.0  # chart distance of the skin row above the upper vermilion border
_LIP_SKIN_BELOW = 2400.0  # ... below the lower one
_LIP_SKIN_CORNERS = 1.09  # the skin row's corners, as a multiple of the outer mouth corners' a
# Dense lattice: inside this chart ellipse (half-width, centre b, half-height) and deeper than this.
_DENSE_FACE = (55000.0, -20000.0, 75000.0)
_DENSE_DEPTH = 40000.0
# Sparser lattice (every other point): |azimuth| and elevation range, degrees.
_SIDE_AZIMUTH = 105.0
_SIDE_ELEVATION = (-68.0, 52.0)
_FEATURE_CLEARANCE = 0.6 * _LATTICE_STEP  # lattice points nearer a feature row than this are dropped
_LIP_CLEARANCE = (1.15, 3200.0, 3400.0)  # no lattice within: x MOUTH_OUTER, above, below the lips
_COARSE_CLEARANCE = 0.75 * _COARSE_STEP  # coarse points nearer a denser vertex are dropped


class VertexTag(IntEnum):
    """What each vertex is; ``Points.extra`` holds a per-tag number."""

    LATTICE = 0
    COARSE = 1
    EYE_LOWER = 2  # lower lid margin
    EYE_INNER = 3  # inside the lid opening (extra = fraction from lower to upper margin)
    EYE_UPPER = 4  # upper lid margin
    EYE_CORNER = 5
    EYE_RING = 6  # skin rows just outside the opening
    MOUTH_BAND = 7  # inner-lip rows and the band between them (extra = 0 upper ... 1 lower)
    MOUTH_CORNER = 8  # inner-lip corners
    LIP_BORDER = 9  # vermilion border and outer mouth corners (extra = 1 upper, -1 lower, 0 corner)
    LIP_INNER = 10  # a row halfway between the vermilion border and the band
    LIP_SKIN = 11  # skin rows just outside the vermilion borders


@dataclass
class Points:
    """Vertex directions under construction with their bookkeeping (one entry per vertex)."""

    dirs: list[np.ndarray] = field(default_factory=list)
    tags: list[np.ndarray] = field(default_factory=list)  # VertexTag of each vertex
    a: list[np.ndarray] = field(default_factory=list)  # chart a (pre-warp) of feature rows, NaN elsewhere
    b: list[np.ndarray] = field(default_factory=list)
    extra: list[np.ndarray] = field(default_factory=list)  # per tag: row fraction, side of an eye, ...

    def add(
        self, dirs: np.ndarray, tag: int, a: np.ndarray | None = None, b: np.ndarray | None = None,
        extra: np.ndarray | float = np.nan,
    ) -> np.ndarray:
        """Append vertices; returns their ids."""
        start = sum(len(d) for d in self.dirs)
        n = len(dirs)
        self.dirs.append(dirs)
        self.tags.append(np.full(n, tag, dtype=np.int16))
        self.a.append(np.full(n, np.nan) if a is None else np.asarray(a, dtype=np.float64))
        self.b.append(np.full(n, np.nan) if b is None else np.asarray(b, dtype=np.float64))
        self.extra.append(np.broadcast_to(np.asarray(extra, dtype=np.float64), (n,)).copy())
        return np.arange(start, start + n)

    def add_chart(self, a: np.ndarray, b: np.ndarray, tag: int, extra: np.ndarray | float = np.nan
                  ) -> np.ndarray:
        """Append vertices at chart points (a, b); returns their ids."""
        return self.add(directions_from_chart(a, b), tag, a, b, extra)

    def arrays(self) -> tuple[np.ndarray, ...]:
        """dirs (N, 3), tags (N,), a (N,), b (N,), extra (N,)."""
        return tuple(np.concatenate(x) for x in (self.dirs, self.tags, self.a, self.b, self.extra))


def sample_points() -> tuple[Points, dict[str, np.ndarray]]:
    """Vertex directions with their tags, and the vertex ids of the feature rows by name."""
    points = Points()
    rows: dict[str, np.ndarray] = {}
    for side in SIDES:
        rows.update(_add_eye(points, side))
    a = np.linspace(-MOUTH_INNER, MOUTH_INNER, MOUTH_SAMPLES)
    rows.update(_add_mouth_band(points, a))
    rows.update(_add_lips(points, a))
    _add_lattice(points)
    _add_coarse(points)
    return points, rows


def _add_eye(points: Points, side: float) -> dict[str, np.ndarray]:
    """Corners, lid margins, rows inside the opening and a ring of skin around one eye."""
    key = "eye_left" if side < 0 else "eye_right"
    eye = eye_rows(side)
    a, lower, upper = eye["a"], eye["lower"], eye["upper"]
    inner_a = a[1:-1]
    rows = {key + "_corners": points.add_chart(a[[0, -1]], lower[[0, -1]], VertexTag.EYE_CORNER, side)}
    rows[key + "_lower"] = points.add_chart(inner_a, lower[1:-1], VertexTag.EYE_LOWER, 0.0)
    for fraction in EYE_FRACTIONS:
        b = lower[1:-1] + fraction * (upper[1:-1] - lower[1:-1])
        rows[f"{key}_{fraction}"] = points.add_chart(inner_a, b, VertexTag.EYE_INNER, fraction)
    rows[key + "_upper"] = points.add_chart(inner_a, upper[1:-1], VertexTag.EYE_UPPER, 1.0)
    step_out = np.sign(a[0] - a[-1]) * _EYE_RING_BEYOND
    ring_a = np.concatenate([a, a, [a[0] + step_out, a[-1] - step_out]])
    ring_b = np.concatenate([upper + _EYE_RING_ABOVE, lower - _EYE_RING_BELOW, [lower[0], lower[-1]]])
    points.add_chart(ring_a, ring_b, VertexTag.EYE_RING, side)
    return rows


def _add_mouth_band(points: Points, a: np.ndarray) -> dict[str, np.ndarray]:
    """The inner-lip rows, the band between them and the inner mouth corners; ``a`` (MOUTH_SAMPLES,)."""
    inner_a = a[1:-1]
    line = mouth_line(inner_a)
    gap = mouth_gap(inner_a)
    rows = {}
    for row, fraction in enumerate(BAND_FRACTIONS):
        b = line + gap * (0.5 - fraction)
        rows[f"mouth_row{row}"] = points.add_chart(inner_a, b, VertexTag.MOUTH_BAND, fraction)
    corners_a = a[[0, -1]]
    rows["mouth_corners"] = points.add_chart(corners_a, mouth_line(corners_a), VertexTag.MOUTH_CORNER)
    return rows


def _add_lips(points: Points, a: np.ndarray) -> dict[str, np.ndarray]:
    """Vermilion borders on the band's columns, a row halfway inside each lip and a skin row
    outside, which keep the colour edge on clean triangles; ``a`` (MOUTH_SAMPLES,)."""
    border_a = a[1:-1]
    line = mouth_line(border_a)
    gap = mouth_gap(border_a)
    outer_a = np.array([-MOUTH_OUTER, MOUTH_OUTER])
    upper_border = mouth_line(border_a) + upper_lip_height(border_a)
    lower_border = mouth_line(border_a) - lower_lip_height(border_a)
    lip_a = np.concatenate([border_a, border_a, outer_a])
    lip_b = np.concatenate([upper_border, lower_border, mouth_line(outer_a)])
    lip_extra = np.concatenate([np.ones(border_a.size), -np.ones(border_a.size), np.zeros(2)])
    lips = points.add_chart(lip_a, lip_b, VertexTag.LIP_BORDER, lip_extra)
    count = border_a.size
    rows = {"lip_upper": lips[:count], "lip_lower": lips[count : 2 * count], "lip_corners": lips[2 * count :]}
    mid_b = np.concatenate([
        0.5 * (upper_border + line + 0.5 * gap), 0.5 * (lower_border + line - 0.5 * gap),
    ])
    points.add_chart(np.concatenate([border_a, border_a]), mid_b, VertexTag.LIP_INNER)
    skin_a = np.concatenate([a, a, outer_a * _LIP_SKIN_CORNERS])
    skin_b = np.concatenate([
        mouth_line(a) + upper_lip_height(a) + _LIP_SKIN_ABOVE,
        mouth_line(a) - lower_lip_height(a) - _LIP_SKIN_BELOW,
        mouth_line(outer_a),
    ])
    points.add_chart(skin_a, skin_b, VertexTag.LIP_SKIN)
    return rows


def _lattice_directions() -> tuple[np.ndarray, np.ndarray]:
    """Hexagonal lattice in the sinusoidal chart (theta cos(phi), phi): directions (N, 3) and
    whether each point also belongs to the hexagonal lattice of twice the step (N,) bool, so a
    sparser region keeps a subset of the points and meets the dense one cleanly.
    """
    h = _LATTICE_STEP
    row_step = h * np.sqrt(3.0) / 2.0
    n_rows = int(np.ceil(np.pi / 2 / row_step))
    n_cols = int(np.ceil(np.pi / h)) + 1
    i, j = np.meshgrid(np.arange(-n_rows, n_rows + 1), np.arange(-n_cols, n_cols + 1), indexing="ij")
    i, j = i.ravel(), j.ravel()
    odd = i % 2 != 0
    u = (j + np.where(odd, 0.5, 0.0)) * h
    phi = i * row_step
    keep = (np.abs(phi) < np.pi / 2 - 1e-6) & (np.abs(u) <= np.pi * np.cos(phi))
    i, j, u, phi = i[keep], j[keep], u[keep], phi[keep]
    theta = u / np.cos(phi)
    coarse = (i % 2 == 0) & np.where(i % 4 == 0, j % 2 == 0, j % 2 != 0)
    return direction(theta, phi), coarse


def _add_lattice(points: Points) -> None:
    """The lattice: every point over the face, every other one over the sides, none on or
    right beside the feature rows already added, nor over the lips."""
    features = np.concatenate(points.dirs)
    dirs, on_coarse_lattice = _lattice_directions()
    a, b, depth = chart_from_directions(dirs)
    theta = np.arctan2(dirs[:, 0], dirs[:, 2])
    phi = np.arcsin(np.clip(dirs[:, 1], -1.0, 1.0))
    half_width, centre_b, half_height = _DENSE_FACE
    core = ((a / half_width) ** 2 + ((b - centre_b) / half_height) ** 2 < 1.0) & (depth > _DENSE_DEPTH)
    low, high = _SIDE_ELEVATION
    mid = (np.abs(theta) < np.deg2rad(_SIDE_AZIMUTH)) & (phi > np.deg2rad(low)) & (phi < np.deg2rad(high))
    dirs = dirs[core | (mid & on_coarse_lattice)]
    near_feature = cKDTree(features).query(dirs)[0] < _FEATURE_CLEARANCE
    a, b, _ = chart_from_directions(dirs)
    wide, above, below = _LIP_CLEARANCE
    in_lips = (
        (np.abs(a) < wide * MOUTH_OUTER)
        & (b < mouth_line(a) + upper_lip_height(a) + above)
        & (b > mouth_line(a) - lower_lip_height(a) - below)
    )
    points.add(dirs[~near_feature & ~in_lips], VertexTag.LATTICE)


def _ring_directions(step: float) -> np.ndarray:
    """Roughly uniform directions (N, 3) on rings of latitude, mirror-symmetric in x."""
    out = []
    n_rings = int(round(np.pi / step))
    for k in range(n_rings + 1):
        phi = -np.pi / 2 + k * np.pi / n_rings
        count = max(1, int(round(2 * np.pi * np.cos(phi) / step)))
        theta = -np.pi + (np.arange(count) + 0.5) * 2 * np.pi / count
        out.append(direction(theta, np.full(count, phi)))
    return np.concatenate(out)


def _add_coarse(points: Points) -> None:
    """Coarse rings wherever no denser vertex is near (the back of the head)."""
    coarse = _ring_directions(_COARSE_STEP)
    taken = np.concatenate(points.dirs)
    points.add(coarse[cKDTree(taken).query(coarse)[0] > _COARSE_CLEARANCE], VertexTag.COARSE)


def triangulate(dirs: np.ndarray) -> np.ndarray:
    """Counter-clockwise (seen from outside) triangles (T, 3) of the convex hull of unit directions."""
    hull = ConvexHull(dirs)
    if len(hull.vertices) != len(dirs):
        raise RuntimeError(f"{len(dirs) - len(hull.vertices)} directions fell inside the hull")
    tris = hull.simplices.astype(np.int64)
    v0, v1, v2 = dirs[tris[:, 0]], dirs[tris[:, 1]], dirs[tris[:, 2]]
    outward = np.einsum("ij,ij->i", np.cross(v1 - v0, v2 - v0), v0 + v1 + v2) > 0
    tris[~outward] = tris[~outward][:, ::-1]
    return tris


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Unit area-weighted vertex normals (3, N) of a mesh (3, N) in a right-handed frame (y up)."""
    v0, v1, v2 = (vertices[:, triangles[:, k]] for k in range(3))
    face = np.cross((v1 - v0).T, (v2 - v0).T)  # (T, 3), length = twice the area
    normals = np.zeros((3, vertices.shape[1]))
    for axis in range(3):
        normals[axis] = np.bincount(
            triangles.reshape(-1), weights=np.repeat(face[:, axis], 3), minlength=vertices.shape[1]
        )
    length = np.linalg.norm(normals, axis=0)
    return normals / np.where(length > 0, length, 1.0)
