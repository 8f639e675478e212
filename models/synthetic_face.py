"""A procedural synthetic head: a stand-in morphable model that needs no download.

The Basel Face Model behind 300W-LP and AFLW2000-3D is distributed only after registration, so
a fresh clone cannot fetch it. :func:`build_synthetic_head` builds, deterministically and in well
under a second, a closed head mesh with the BFM's units and axes, the 68 iBUG landmarks as fixed
vertices, 40 identity and 10 expression modes, and per-vertex colours, so the whole pipeline
(rendering, labels, training, evaluation) runs end to end. Real training uses the Basel Face
Model the user supplies, through the loaders of :mod:`models.morphable`; nothing here is fitted
to real faces, and figures measured on faces rendered from it are synthetic figures.

Geometry. Model coordinates as in the BFM trimmed by 3DDFA: units of about a micrometre (a face
is ~150000 wide), x toward the subject's left (image-left is x < 0 in a frontal view), y up,
z toward the camera. The surface is star-shaped around a point inside the skull: every vertex is
``centre + r(direction) * direction``, with r a smooth union of ellipsoid-like primitives (skull,
lower face, neck, ears) plus smooth bumps and dents for the features (brow ridge, eye sockets,
nose, lips, chin, cheekbones, hair). Vertex directions are sampled densely over the face (~2.4 mm
apart), more sparsely over the sides and coarsely over the back, with explicit rows of vertices
along the eyelid margins and the lips, and triangulated as the convex hull of the directions
(a spherical Delaunay triangulation): a closed mesh, counter-clockwise seen from outside. Eyes are
spheres seen through the lid opening. Between the inner lips is a band of vertices that is
collapsed to zero height in the mean shape; ``jaw_open`` uncovers it (coloured mouth interior).

Landmarks follow the iBUG 300-W order and are 3D surface points like 3DDFA's ``pt3d_68``: the
jaw points are fixed vertices on the side of the face, not the silhouette.

Identity modes (``shape_basis``): 19 named smooth deformations (size, face length, head width,
profile depth, jaw width, chin, nose length / width / projection, eye spacing / size, brow
height, lip fullness, cheek fullness, forehead slope, mouth width, nose bridge, cheekbones, jaw
angle) then 21 random low-frequency fields (fixed seed), orthogonalised in that order. Their
coefficients have 300W-LP's ``Shape_Para`` scale: ``shape_std`` decays from 5.9e5.

Expression modes, in order (:data:`EXPRESSION_NAMES`); coefficients are O(1) and one prior
standard deviation (``expression_std``) is a clearly visible expression:
``jaw_open`` (meant to be >= 0: a negative value pushes the lips through each other), ``smile``,
``frown`` (mouth corners down), ``lip_pucker``, ``brow_raise``, ``brow_furrow``, ``eyes_close``
(1.0 = closed, negative = wide open), ``wink_image_left`` (closes the eye with x < 0, landmarks
36-41), ``cheek_puff``, ``wink_image_right`` (its mirror image: the eye with x > 0, 42-47).

Both bases are closed under left/right mirroring (every identity mode is mirror-symmetric or
mirror-antisymmetric; the two winks mirror each other), so a mirrored face is again a face of the
model and a horizontal flip has an exact 62-d label (:mod:`models.mirror`).

Regions (``vertex_region``, int8; the ids are class constants of :class:`SyntheticHead`):
0 SKIN, 1 LIPS, 2 EYEBROW, 3 SCLERA, 4 IRIS, 5 PUPIL, 6 HAIR (scalp), 7 MOUTH_INTERIOR,
8 NOSTRIL, 9 LASH (upper lid margin). Skin-toned regions are SKIN, LIPS, NOSTRIL; hair-toned
ones are HAIR and EYEBROW (see :meth:`SyntheticHead.colours`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy.spatial import ConvexHull, cKDTree

from models.morphable import NUM_LANDMARKS, MorphableModel
from models.params import NUM_EXPRESSION, NUM_SHAPE

EXPRESSION_NAMES: tuple[str, ...] = (
    "jaw_open", "smile", "frown", "lip_pucker", "brow_raise",
    "brow_furrow", "eyes_close", "wink_image_left", "cheek_puff", "wink_image_right",
)
REGION_NAMES: tuple[str, ...] = (
    "skin", "lips", "eyebrow", "sclera", "iris", "pupil", "hair", "mouth_interior", "nostril",
    "lash",
)

# Every vertex is CENTRE + r * direction: the head is star-shaped around this point in the skull.
_CENTRE = np.array([0.0, 15000.0, 0.0])
# Face chart: a direction maps to (a, b), the x and y where its ray leaves this ellipsoid, which
# lies close to the face; features are placed in (a, b), i.e. roughly in frontal x and y.
_CHART_CENTRE = np.array([0.0, -10000.0, 15000.0])
_CHART_AXES = np.array([85000.0, 125000.0, 90000.0])
_LATTICE_STEP = 0.024  # radians between neighbouring face vertices (~2.4 mm at the face)

# Neutral albedos, BGR in [0, 1].
_SKIN = np.array([0.47, 0.58, 0.78])
_LIPS = np.array([0.36, 0.34, 0.64])
_BROW = np.array([0.10, 0.14, 0.20])
_SCLERA = np.array([0.86, 0.88, 0.90])
_IRIS = np.array([0.13, 0.25, 0.36])
_PUPIL = np.array([0.03, 0.03, 0.03])
_HAIR = np.array([0.08, 0.11, 0.15])
_MOUTH = np.array([0.07, 0.07, 0.30])
_NOSTRIL = np.array([0.14, 0.18, 0.30])
_LASH = np.array([0.07, 0.08, 0.10])

# Eyes (image-left one, x < 0; the other is its mirror), in chart units.
_EYE_OUTER = np.array([-43500.0, 27000.0])
_EYE_INNER = np.array([-19500.0, 25800.0])
_EYE_UPPER = 5600.0  # upper lid margin height above the corner line, at its peak
_EYE_LOWER = 3600.0
_EYE_SAMPLES = 19  # vertices along each lid row, corners included
_EYE_FRACTIONS = (0.2, 0.4, 0.6, 0.8)  # rows inside the opening, from lower to upper margin
_EYEBALL_CENTRE = np.array([-30500.0, 25500.0, 80500.0])
_EYEBALL_RADIUS = 16500.0
_IRIS_RADIUS = 5600.0
_PUPIL_RADIUS = 2200.0

# Mouth, in chart units: inner-lip corners at +-_MOUTH_INNER, outer corners at +-_MOUTH_OUTER.
_MOUTH_INNER = 24000.0
_MOUTH_OUTER = 26000.0
_MOUTH_LINE = -43500.0  # at the centre; the corners sit 2000 higher
_MOUTH_GAP = 3600.0  # parameter-space height of the inner-mouth band (collapsed in the mean)
_MOUTH_WARP = 8000.0  # how far above and below the band the collapse is spread out
_MOUTH_SAMPLES = 31
_BAND_FRACTIONS = (0.0, 0.12, 0.5, 0.88, 1.0)  # band rows: upper inner lip ... lower inner lip


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

    SKIN: ClassVar[int] = 0
    LIPS: ClassVar[int] = 1
    EYEBROW: ClassVar[int] = 2
    SCLERA: ClassVar[int] = 3
    IRIS: ClassVar[int] = 4
    PUPIL: ClassVar[int] = 5
    HAIR: ClassVar[int] = 6
    MOUTH_INTERIOR: ClassVar[int] = 7
    NOSTRIL: ClassVar[int] = 8
    LASH: ClassVar[int] = 9
    NEUTRAL_SKIN_BGR: ClassVar[tuple[float, ...]] = tuple(float(c) for c in _SKIN)
    NEUTRAL_HAIR_BGR: ClassVar[tuple[float, ...]] = tuple(float(c) for c in _HAIR)

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
        out = skin_part * (skin / _SKIN) + hair_part * (hair / _HAIR) + fixed_part
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


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Unit area-weighted vertex normals (3, N) of a mesh in a right-handed frame (y up)."""
    v0, v1, v2 = (vertices[:, triangles[:, k]] for k in range(3))
    face = np.cross((v1 - v0).T, (v2 - v0).T)  # (T, 3), length = twice the area
    normals = np.zeros((3, vertices.shape[1]))
    for axis in range(3):
        normals[axis] = np.bincount(
            triangles.reshape(-1), weights=np.repeat(face[:, axis], 3), minlength=vertices.shape[1]
        )
    length = np.linalg.norm(normals, axis=0)
    return normals / np.where(length > 0, length, 1.0)


# -- small smooth helpers ------------------------------------------------------------------------


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth maximum: equals max(a, b) when they differ by more than k, rounded in between."""
    return np.maximum(a, b) + np.maximum(k - np.abs(a - b), 0.0) ** 2 / (4.0 * k)


def _gauss(points: np.ndarray, centre: tuple[float, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """exp(-|(p - c) / sigma|^2 / 2) over the leading rows of ``points`` (D, N)."""
    d = len(centre)
    offset = (points[:d] - np.reshape(centre, (d, 1))) / np.reshape(sigma, (d, 1))
    return np.exp(-0.5 * np.sum(offset**2, axis=0))


# -- directions, the face chart and the head's radius ---------------------------------------------


def _direction(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Unit directions (N, 3); theta = azimuth from +z toward +x, phi = elevation."""
    return np.stack([np.cos(phi) * np.sin(theta), np.sin(phi), np.cos(phi) * np.cos(theta)], axis=1)


def _ellipsoid_exit(dirs: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Distance from _CENTRE along each direction to where it leaves an ellipsoid (0: misses)."""
    o = (_CENTRE - centre) / axes
    d = dirs / axes
    qa = np.sum(d * d, axis=1)
    qb = 2.0 * d @ o
    qc = o @ o - 1.0
    disc = qb * qb - 4.0 * qa * qc
    root = (-qb + np.sqrt(np.maximum(disc, 0.0))) / (2.0 * qa)
    return np.where(disc > 0, np.maximum(root, 0.0), 0.0)


def _superellipsoid_exit(
    dirs: np.ndarray, centre: tuple[float, float, float], axes: tuple[float, float, float],
    powers: tuple[float, float, float], taper: float = 0.0, reach: float = 260000.0,
) -> np.ndarray:
    """Like :func:`_ellipsoid_exit` for ``sum |(p - c) / axes|^powers = 1`` (convex: powers >= 1).

    ``taper`` widens x linearly with height: the x axis is ``axes[0] * (1 + taper * dy / axes[1])``.
    The last inside sample along the ray is refined by bisection; 0 where the ray misses.
    """
    centre_arr = np.asarray(centre)
    axes_arr = np.asarray(axes)
    powers_arr = np.asarray(powers)

    def level(t: np.ndarray) -> np.ndarray:  # t (N, S) -> implicit value (N, S)
        q = (_CENTRE[None, None, :] + t[..., None] * dirs[:, None, :] - centre_arr) / axes_arr
        q[..., 0] /= np.maximum(1.0 + taper * q[..., 1], 0.2)
        return np.sum(np.abs(q) ** powers_arr, axis=-1)

    samples = np.linspace(0.0, reach, 65)[1:]
    values = level(np.broadcast_to(samples, (len(dirs), samples.size)))
    inside = values < 1.0
    hit = inside.any(axis=1)
    last = samples.size - 1 - np.argmax(inside[:, ::-1], axis=1)
    lo = samples[last]
    hi = np.where(last + 1 < samples.size, samples[np.minimum(last + 1, samples.size - 1)], reach)
    for _ in range(24):
        mid = 0.5 * (lo + hi)
        is_in = level(mid[:, None])[:, 0] < 1.0
        lo = np.where(is_in, mid, lo)
        hi = np.where(is_in, hi, mid)
    return np.where(hit, 0.5 * (lo + hi), 0.0)


def _chart_from_directions(dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, depth) of directions (N, 3): where their rays leave the chart ellipsoid."""
    t = _ellipsoid_exit(dirs, _CHART_CENTRE, _CHART_AXES)
    points = _CENTRE + t[:, None] * dirs
    return points[:, 0], points[:, 1], points[:, 2]


def _directions_from_chart(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unit directions (N, 3) toward chart points on the front of the chart ellipsoid."""
    u = (a / _CHART_AXES[0]) ** 2 + ((b - _CHART_CENTRE[1]) / _CHART_AXES[1]) ** 2
    z = _CHART_CENTRE[2] + _CHART_AXES[2] * np.sqrt(np.clip(1.0 - u, 1e-6, None))
    p = np.stack([a, b, z], axis=1) - _CENTRE
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def _head_radius(dirs: np.ndarray) -> np.ndarray:
    """Distance from _CENTRE to the featureless head (skull, lower face, neck, ears) (N,)."""
    skull = _superellipsoid_exit(
        dirs, (0.0, 50000.0, 4000.0), (76000.0, 95000.0, 104000.0), (2.3, 2.2, 2.2))
    face = _superellipsoid_exit(
        dirs, (0.0, -28000.0, 32000.0), (64000.0, 68000.0, 70000.0), (2.4, 2.6, 2.4), taper=0.25)
    neck = _superellipsoid_exit(
        dirs, (0.0, -95000.0, -10000.0), (46000.0, 80000.0, 50000.0), (2.0, 10.0, 2.0))
    radius = _smax(skull, face, 14000.0)
    radius = _smax(radius, neck, 18000.0)
    for side in (-1.0, 1.0):
        ear = _ellipsoid_exit(dirs, np.array([side * 74000.0, 10000.0, -8000.0]),
                              np.array([11000.0, 30000.0, 17000.0]))
        radius = _smax(radius, ear, 5000.0)
    return radius


# -- feature curves (chart units) ---------------------------------------------------------------


def _eye_rows(side: float) -> dict[str, np.ndarray]:
    """Lid rows of one eye (side -1: x < 0): a, lower and upper b, outer -> inner corner."""
    tau = np.linspace(0.0, 1.0, _EYE_SAMPLES)
    outer, inner = _EYE_OUTER, _EYE_INNER
    a = outer[0] + tau * (inner[0] - outer[0])
    base = outer[1] + tau * (inner[1] - outer[1])
    # Upper lid peaks a little toward the nose, lower lid a little toward the temple.
    upper = base + _EYE_UPPER * np.sin(np.pi * tau ** 1.15) ** 0.85
    lower = base - _EYE_LOWER * np.sin(np.pi * tau ** 0.9) ** 0.9
    return {"a": a if side < 0 else -a, "lower": lower, "upper": upper}


def _mouth_line(a: np.ndarray) -> np.ndarray:
    return _MOUTH_LINE + 2000.0 * (a / _MOUTH_INNER) ** 2


def _mouth_gap(a: np.ndarray) -> np.ndarray:
    return _MOUTH_GAP * np.clip(1.0 - (a / _MOUTH_INNER) ** 2, 0.0, None) ** 0.35


def _upper_lip_height(a: np.ndarray) -> np.ndarray:
    """Vermilion height of the upper lip above the mouth line, with a cupid's bow."""
    r = np.clip(np.abs(a) / _MOUTH_OUTER, 0.0, 1.0)
    height = 7600.0 * (1.0 - r**2.2) ** 0.7
    dip = 1300.0 * np.exp(-((a / 2600.0) ** 2))
    peaks = 700.0 * np.exp(-(((np.abs(a) - 5800.0) / 3000.0) ** 2))
    return height - dip + peaks


def _lower_lip_height(a: np.ndarray) -> np.ndarray:
    r = np.clip(np.abs(a) / _MOUTH_OUTER, 0.0, 1.0)
    return 10000.0 * (1.0 - r**2.0) ** 0.8


def _mouth_warp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chart b after collapsing the inner-mouth band onto the mouth line (monotone in b)."""
    line = _mouth_line(a)
    half = 0.5 * _mouth_gap(a)
    above = b - (line + half)
    below = (line - half) - b
    falloff_above = np.clip(1.0 - above / _MOUTH_WARP, 0.0, 1.0) ** 2
    falloff_below = np.clip(1.0 - below / _MOUTH_WARP, 0.0, 1.0) ** 2
    out = np.where(above >= 0, b - half * falloff_above, line)
    return np.where(below >= 0, b + half * falloff_below, out)


def _brow_curve(side: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eyebrow centre line (a, b) and half-thickness, 5 landmark points, outer -> inner."""
    a = np.array([-58000.0, -47500.0, -36000.0, -24000.0, -12000.0])
    b = np.array([37000.0, 43500.0, 46500.0, 46000.0, 42500.0])
    thickness = np.array([2400.0, 3200.0, 3600.0, 3900.0, 4300.0])
    return (a if side < 0 else -a), b, thickness


def _feature_offset(a: np.ndarray, b: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Radial offset (N,) of the facial features at chart points (a, b) (after the mouth warp)."""
    front = _smoothstep(depth, 20000.0, 60000.0)
    ab = np.stack([a, b])
    offset = np.zeros_like(a)

    # Nose: a ridge whose height and width follow a profile down the face, plus nostril wings.
    ridge_b = [-24000.0, -18500.0, -12000.0, -6000.0, -1000.0, 3500.0, 11000.0, 19000.0, 27000.0,
               36000.0]
    ridge_h = [0.0, 5000.0, 16000.0, 27000.0, 31000.0, 28000.0, 20000.0, 11500.0, 4500.0, 0.0]
    ridge_w = [7000.0, 8000.0, 9000.0, 9200.0, 8600.0, 8000.0, 7000.0, 6000.0, 6500.0, 9000.0]
    height = np.interp(b, ridge_b, ridge_h, left=0.0, right=0.0)
    width = np.interp(b, ridge_b, ridge_w)
    offset += height * np.exp(-((np.abs(a) / width) ** 2.6))
    for side in (-1.0, 1.0):
        offset += 9000.0 * _gauss(ab, (side * 11500.0, -17500.0), (5000.0, 4200.0))

    # Brow ridge and glabella, eye sockets, cheekbones.
    for side in (-1.0, 1.0):
        offset += 5500.0 * _gauss(ab, (side * 30000.0, 40000.0), (17000.0, 6500.0))
        offset -= 8000.0 * _gauss(ab, (side * 31000.0, 26000.0), (14000.0, 9500.0))
        offset += 4500.0 * _gauss(ab, (side * 46000.0, 4000.0), (13000.0, 10000.0))
    offset += 3000.0 * _gauss(ab, (0.0, 36000.0), (9000.0, 7000.0))

    # Lips around the mouth line, with a crease where they meet; chin and the dent above it.
    line = _mouth_line(a)
    across = np.exp(-((np.abs(a) / 23000.0) ** 4))
    offset += across * (
        5200.0 * np.exp(-0.5 * ((b - line - 3600.0) / 3400.0) ** 2)
        + 5600.0 * np.exp(-0.5 * ((b - line + 4800.0) / 3800.0) ** 2)
        - 2200.0 * np.exp(-0.5 * ((b - line) / 1100.0) ** 2)
    )
    offset += 3500.0 * _gauss(ab, (0.0, -30000.0), (9000.0, 6000.0))  # philtrum / upper-lip base
    offset += 12000.0 * _gauss(ab, (0.0, -80000.0), (16000.0, 10000.0))
    offset -= 2500.0 * _gauss(ab, (0.0, -61000.0), (14000.0, 3500.0))
    return offset * front


# -- vertex directions and triangulation ------------------------------------------------------


@dataclass
class _Points:
    """Vertex directions under construction with their bookkeeping (one entry per vertex)."""

    dirs: list[np.ndarray]
    tags: list[np.ndarray]  # what each vertex is (see _TAG_*)
    a: list[np.ndarray]  # chart a (pre-warp) of feature vertices, NaN elsewhere
    b: list[np.ndarray]
    extra: list[np.ndarray]  # a per-tag number: row fraction for lens rows, side for eyes, ...

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

    def arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(np.concatenate(x) for x in (self.dirs, self.tags, self.a, self.b, self.extra))


_TAG_LATTICE = 0
_TAG_COARSE = 1
_TAG_EYE_LOWER = 2  # lower lid margin
_TAG_EYE_INNER = 3  # inside the lid opening (extra = fraction from lower to upper margin)
_TAG_EYE_UPPER = 4  # upper lid margin
_TAG_EYE_CORNER = 5
_TAG_EYE_RING = 6  # skin rows just outside the opening
_TAG_MOUTH_BAND = 7  # inner-lip rows and the band between them (extra = 0 upper ... 1 lower)
_TAG_MOUTH_CORNER = 8  # inner-lip corners
_TAG_LIP_BORDER = 9  # vermilion border and outer mouth corners
_TAG_LIP_INNER = 10  # a row halfway between the vermilion border and the band
_TAG_LIP_SKIN = 11  # skin rows just outside the vermilion borders


def _lattice_directions() -> tuple[np.ndarray, np.ndarray]:
    """Hexagonal lattice in the sinusoidal chart (theta cos(phi), phi): directions (N, 3) and
    whether each point also belongs to the hexagonal lattice of twice the step (N,) bool, so a
    sparser region keeps a subset of the points and meets the dense one cleanly.
    """
    h = _LATTICE_STEP
    row_step = h * np.sqrt(3.0) / 2.0
    n_rows = int(np.ceil(np.pi / 2 / row_step))
    n_cols = int(np.ceil(np.pi / h)) + 1
    i, j = np.meshgrid(np.arange(-n_rows, n_rows + 1), np.arange(-n_cols, n_cols + 1),
                       indexing="ij")
    i, j = i.ravel(), j.ravel()
    odd = i % 2 != 0
    u = (j + np.where(odd, 0.5, 0.0)) * h
    phi = i * row_step
    keep = (np.abs(phi) < np.pi / 2 - 1e-6) & (np.abs(u) <= np.pi * np.cos(phi))
    i, j, u, phi = i[keep], j[keep], u[keep], phi[keep]
    theta = u / np.cos(phi)
    coarse = (i % 2 == 0) & np.where(i % 4 == 0, j % 2 == 0, j % 2 != 0)
    return _direction(theta, phi), coarse


def _ring_directions(step: float) -> np.ndarray:
    """Roughly uniform directions on rings of latitude, mirror-symmetric in x."""
    out = []
    n_rings = int(round(np.pi / step))
    for k in range(n_rings + 1):
        phi = -np.pi / 2 + k * np.pi / n_rings
        count = max(1, int(round(2 * np.pi * np.cos(phi) / step)))
        theta = -np.pi + (np.arange(count) + 0.5) * 2 * np.pi / count
        out.append(_direction(theta, np.full(count, phi)))
    return np.concatenate(out)


def _sample_points() -> tuple[_Points, dict[str, np.ndarray]]:
    """Vertex directions with their tags, and the vertex ids of the feature rows by name."""
    points = _Points([], [], [], [], [])
    ids: dict[str, np.ndarray] = {}

    # Feature rows first (chart coordinates, pre-warp).
    for side in (-1.0, 1.0):
        rows = _eye_rows(side)
        a, lower, upper = rows["a"], rows["lower"], rows["upper"]
        inner_a = a[1:-1]
        key = "eye_left" if side < 0 else "eye_right"
        ids[key + "_corners"] = points.add(
            _directions_from_chart(a[[0, -1]], lower[[0, -1]]), _TAG_EYE_CORNER, a[[0, -1]],
            lower[[0, -1]], side,
        )
        ids[key + "_lower"] = points.add(
            _directions_from_chart(inner_a, lower[1:-1]), _TAG_EYE_LOWER, inner_a, lower[1:-1], 0.0
        )
        for fraction in _EYE_FRACTIONS:
            b = lower[1:-1] + fraction * (upper[1:-1] - lower[1:-1])
            ids[f"{key}_{fraction}"] = points.add(
                _directions_from_chart(inner_a, b), _TAG_EYE_INNER, inner_a, b, fraction
            )
        ids[key + "_upper"] = points.add(
            _directions_from_chart(inner_a, upper[1:-1]), _TAG_EYE_UPPER, inner_a, upper[1:-1], 1.0
        )
        ring_up = upper + 2300.0
        ring_low = lower - 2100.0
        step_out = np.sign(a[0] - a[-1]) * 2300.0
        ring_a = np.concatenate([a, a, [a[0] + step_out, a[-1] - step_out]])
        ring_b = np.concatenate([ring_up, ring_low, [lower[0], lower[-1]]])
        points.add(_directions_from_chart(ring_a, ring_b), _TAG_EYE_RING, ring_a, ring_b, side)

    a = np.linspace(-_MOUTH_INNER, _MOUTH_INNER, _MOUTH_SAMPLES)
    inner_a = a[1:-1]
    line = _mouth_line(inner_a)
    gap = _mouth_gap(inner_a)
    for row, fraction in enumerate(_BAND_FRACTIONS):
        b = line + gap * (0.5 - fraction)
        ids[f"mouth_row{row}"] = points.add(
            _directions_from_chart(inner_a, b), _TAG_MOUTH_BAND, inner_a, b, fraction
        )
    corners_a = a[[0, -1]]
    ids["mouth_corners"] = points.add(
        _directions_from_chart(corners_a, _mouth_line(corners_a)), _TAG_MOUTH_CORNER, corners_a,
        _mouth_line(corners_a),
    )
    # Vermilion borders share the band's columns; a row halfway inside each lip and a skin row
    # outside keep the colour edge on clean triangles.
    border_a = a[1:-1]
    outer_a = np.array([-_MOUTH_OUTER, _MOUTH_OUTER])
    upper_border = _mouth_line(border_a) + _upper_lip_height(border_a)
    lower_border = _mouth_line(border_a) - _lower_lip_height(border_a)
    lip_a = np.concatenate([border_a, border_a, outer_a])
    lip_b = np.concatenate([upper_border, lower_border, _mouth_line(outer_a)])
    lip_extra = np.concatenate([np.ones(border_a.size), -np.ones(border_a.size), np.zeros(2)])
    lips = points.add(
        _directions_from_chart(lip_a, lip_b), _TAG_LIP_BORDER, lip_a, lip_b, lip_extra)
    count = border_a.size
    ids["lip_upper"], ids["lip_lower"] = lips[:count], lips[count : 2 * count]
    ids["lip_corners"] = lips[2 * count :]
    mid_b = np.concatenate([
        0.5 * (upper_border + line + 0.5 * gap), 0.5 * (lower_border + line - 0.5 * gap),
    ])
    mid_a = np.concatenate([border_a, border_a])
    points.add(_directions_from_chart(mid_a, mid_b), _TAG_LIP_INNER, mid_a, mid_b)
    skin_a = np.concatenate([a, a, outer_a * 1.09])
    skin_b = np.concatenate([
        _mouth_line(a) + _upper_lip_height(a) + 2200.0,
        _mouth_line(a) - _lower_lip_height(a) - 2400.0,
        _mouth_line(outer_a),
    ])
    points.add(_directions_from_chart(skin_a, skin_b), _TAG_LIP_SKIN, skin_a, skin_b)
    features = np.concatenate(points.dirs)

    # Lattice: fine over the face, every other point over the sides, then coarse rings.
    dirs, on_coarse_lattice = _lattice_directions()
    a, b, depth = _chart_from_directions(dirs)
    theta = np.arctan2(dirs[:, 0], dirs[:, 2])
    phi = np.arcsin(np.clip(dirs[:, 1], -1.0, 1.0))
    core = ((a / 55000.0) ** 2 + ((b + 20000.0) / 75000.0) ** 2 < 1.0) & (depth > 40000.0)
    mid = (np.abs(theta) < np.deg2rad(105.0)) & (phi > np.deg2rad(-68.0)) & (phi < np.deg2rad(52.0))
    keep = core | (mid & on_coarse_lattice)
    dirs = dirs[keep]
    near_feature = cKDTree(features).query(dirs)[0] < 0.6 * _LATTICE_STEP
    a, b, _ = _chart_from_directions(dirs)
    in_lips = (
        (np.abs(a) < 1.15 * _MOUTH_OUTER)
        & (b < _mouth_line(a) + _upper_lip_height(a) + 3200.0)
        & (b > _mouth_line(a) - _lower_lip_height(a) - 3400.0)
    )
    dirs = dirs[~near_feature & ~in_lips]
    points.add(dirs, _TAG_LATTICE)

    coarse_step = 4.0 * _LATTICE_STEP
    coarse = _ring_directions(coarse_step)
    taken = np.concatenate(points.dirs)
    coarse = coarse[cKDTree(taken).query(coarse)[0] > 0.75 * coarse_step]
    points.add(coarse, _TAG_COARSE)
    return points, ids


def _triangulate(dirs: np.ndarray) -> np.ndarray:
    """Counter-clockwise (seen from outside) triangles of the convex hull of unit directions."""
    hull = ConvexHull(dirs)
    if len(hull.vertices) != len(dirs):
        raise RuntimeError(f"{len(dirs) - len(hull.vertices)} directions fell inside the hull")
    tris = hull.simplices.astype(np.int64)
    v0, v1, v2 = dirs[tris[:, 0]], dirs[tris[:, 1]], dirs[tris[:, 2]]
    outward = np.einsum("ij,ij->i", np.cross(v1 - v0, v2 - v0), v0 + v1 + v2) > 0
    tris[~outward] = tris[~outward][:, ::-1]
    return tris


def _sphere_exit(dirs: np.ndarray, centre: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Distance from _CENTRE along each direction to where it leaves a sphere (0: misses)."""
    o = _CENTRE - centre
    qb = dirs @ o
    disc = qb * qb - (o @ o - radius**2)
    return np.where(disc > 0, -qb + np.sqrt(np.maximum(disc, 0.0)), 0.0)


def _eye_distance(a: np.ndarray, b: np.ndarray, side: float) -> np.ndarray:
    """Approximate chart distance (N,) from the lid opening of one eye (0 inside)."""
    rows = _eye_rows(side)
    order = np.argsort(rows["a"])
    ea, lower, upper = rows["a"][order], rows["lower"][order], rows["upper"][order]
    clamped = np.clip(a, ea[0], ea[-1])
    da = np.abs(a - clamped)
    db = (np.maximum(b - np.interp(clamped, ea, upper), 0.0)
          + np.maximum(np.interp(clamped, ea, lower) - b, 0.0))
    return np.hypot(da, db)


def _eyeball_centre(side: float) -> np.ndarray:
    return _EYEBALL_CENTRE * np.array([-side, 1.0, 1.0])


def _mean_surface(dirs: np.ndarray, tags: np.ndarray, feat_a: np.ndarray, feat_b: np.ndarray
                  ) -> tuple[np.ndarray, ...]:
    """Mean vertex positions (N, 3), chart a, b (pre-warp), b after the warp, and chart depth."""
    a, b, depth = _chart_from_directions(dirs)
    exact = ~np.isnan(feat_a)
    a[exact], b[exact] = feat_a[exact], feat_b[exact]
    warped = _mouth_warp(a, b)
    in_band = (tags == _TAG_MOUTH_BAND) | (tags == _TAG_MOUTH_CORNER)
    warped[in_band] = _mouth_line(a[in_band])  # exactly on the line, so the band is flat
    moved = (warped != b) & (depth > 0)
    dirs = dirs.copy()
    dirs[moved] = _directions_from_chart(a[moved], warped[moved])
    radius = _head_radius(dirs) + _feature_offset(a, warped, depth) + 3000.0 * _hair_weight(dirs)

    opening = tags == _TAG_EYE_INNER
    for side in (-1.0, 1.0):
        centre = _eyeball_centre(side)
        this_side = (a * side > 0) & (depth > 0)
        distance = _eye_distance(a, b, side)
        near = this_side & (distance < 30000.0)
        lid = _sphere_exit(dirs[near], centre, _EYEBALL_RADIUS + 800.0 - 0.3 * distance[near])
        radius[near] = _smax(radius[near], lid, 2500.0)
        inside = opening & this_side
        radius[inside] = _sphere_exit(dirs[inside], centre, np.full(inside.sum(), _EYEBALL_RADIUS))
    return _CENTRE + radius[:, None] * dirs, a, b, warped, depth


# Semantic 3D positions used to pick the landmark vertices that are not on a feature row: the
# vertex whose direction from _CENTRE is nearest wins. Left half only (x <= 0); mirrored.
_JAW_TARGETS = np.array([
    [-73600.0, 18500.0, 17800.0], [-72300.0, 0.0, 20500.0], [-69000.0, -19000.0, 26000.0],
    [-63500.0, -37500.0, 34000.0], [-55000.0, -54500.0, 45000.0], [-43000.0, -68500.0, 60000.0],
    [-29500.0, -78500.0, 76000.0], [-15000.0, -84500.0, 89000.0], [0.0, -86400.0, 96300.0],
])
_NOSE_TARGETS = np.array([
    [0.0, 26300.0, 111400.0], [0.0, 17500.0, 117500.0], [0.0, 8500.0, 124500.0],
    [0.0, -8000.0, 132000.0],
])
_NOSTRIL_TARGETS = np.array([[-10500.0, -21000.0, 106000.0], [-5200.0, -23500.0, 110000.0],
                             [0.0, -25000.0, 112000.0]])


def _nearest_direction(positions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target (K, 3), the vertex in the direction nearest to it; midline targets (x = 0)
    only consider midline vertices, so that they stay exactly symmetric."""
    directions = positions - _CENTRE
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wanted = targets - _CENTRE
    wanted /= np.linalg.norm(wanted, axis=1, keepdims=True)
    found = cKDTree(directions).query(wanted)[1]
    on_midline = targets[:, 0] == 0.0
    if np.any(on_midline):
        midline = np.flatnonzero(np.abs(positions[:, 0]) < 1e-6)
        found[on_midline] = midline[cKDTree(directions[midline]).query(wanted[on_midline])[1]]
    return found


def _mirror_ids(positions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The vertices at the x-mirrored positions of ``ids`` (the point set is mirror-symmetric)."""
    mirrored = positions[ids] * np.array([-1.0, 1.0, 1.0])
    distance, found = cKDTree(positions).query(mirrored)
    if np.any(distance > 1.0):
        raise RuntimeError(f"no mirror vertex within 1 unit for {ids[distance > 1.0]}")
    return found


def _landmark_ids(positions: np.ndarray, rows: dict[str, np.ndarray]) -> np.ndarray:
    """The 68 iBUG landmark vertex ids."""
    out = np.full(NUM_LANDMARKS, -1, dtype=np.int64)
    jaw_left = _nearest_direction(positions, _JAW_TARGETS)
    out[0:9] = jaw_left
    out[9:17] = _mirror_ids(positions, jaw_left[:8])[::-1]
    brow_a, brow_b, _ = _brow_curve(-1.0)
    brow_dirs = _directions_from_chart(brow_a, brow_b)
    brow_left = _nearest_direction(positions, _CENTRE + brow_dirs * 1000.0)
    out[17:22] = brow_left
    out[22:27] = _mirror_ids(positions, brow_left)[::-1]
    out[27:31] = _nearest_direction(positions, _NOSE_TARGETS)
    # The tip is the most forward vertex near the midline.
    midline = np.flatnonzero(np.abs(positions[:, 0]) < 1e-6)
    out[30] = midline[np.argmax(positions[midline, 2])]
    nostrils = _nearest_direction(positions, _NOSTRIL_TARGETS)
    out[31:34] = nostrils
    out[34:36] = _mirror_ids(positions, nostrils[:2])[::-1]
    for side, first in (("left", 36), ("right", 42)):
        outer, inner = rows[f"eye_{side}_corners"]
        upper, lower = rows[f"eye_{side}_upper"], rows[f"eye_{side}_lower"]
        # Rows run outer -> inner corner; landmarks sit at 1/3 and 2/3 of the way.
        third, two_thirds = (_EYE_SAMPLES - 1) // 3 - 1, 2 * (_EYE_SAMPLES - 1) // 3 - 1
        if side == "left":
            out[first:first + 6] = [
                outer, upper[third], upper[two_thirds], inner, lower[two_thirds], lower[third]]
        else:
            out[first:first + 6] = [
                inner, upper[two_thirds], upper[third], outer, lower[third], lower[two_thirds]]
    upper_lip, lower_lip = rows["lip_upper"], rows["lip_lower"]
    left_corner, right_corner = rows["lip_corners"]
    # Lip rows run left -> right, 1600 units apart: 49/53 sit 16000 from the centre, 50/52 6400.
    centre = len(upper_lip) // 2
    outer = [centre - 10, centre - 4, centre, centre + 4, centre + 10]
    inner = [centre - 6, centre, centre + 6]
    out[48:60] = [left_corner, *upper_lip[outer], right_corner, *lower_lip[outer[::-1]]]
    inner_left, inner_right = rows["mouth_corners"]
    top, bottom = rows["mouth_row0"], rows[f"mouth_row{len(_BAND_FRACTIONS) - 1}"]
    out[60:68] = [inner_left, *top[inner], inner_right, *bottom[inner[::-1]]]
    return out


# -- colours -----------------------------------------------------------------------------------

# Hairline: lowest elevation (degrees) of scalp hair against |azimuth| (degrees) from the face.
_HAIRLINE_AZIMUTH = (0.0, 25.0, 45.0, 60.0, 72.0, 80.0, 85.0, 92.0, 100.0, 110.0, 120.0, 150.0,
                     180.0)
_HAIRLINE_ELEVATION = (46.0, 44.0, 38.0, 30.0, 20.0, 5.0, 8.0, 26.0, 26.0, 10.0, -20.0, -35.0,
                       -40.0)


def _hair_weight(dirs: np.ndarray) -> np.ndarray:
    """Soft scalp-hair membership (N,) in [0, 1] of directions from _CENTRE."""
    azimuth = np.degrees(np.abs(np.arctan2(dirs[:, 0], dirs[:, 2])))
    elevation = np.degrees(np.arcsin(np.clip(dirs[:, 1], -1.0, 1.0)))
    line = np.interp(azimuth, _HAIRLINE_AZIMUTH, _HAIRLINE_ELEVATION)
    return _smoothstep(elevation - line, -2.0, 2.0)


def _brow_weight(a: np.ndarray, b: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Soft eyebrow membership (N,) from chart coordinates."""
    weight = np.zeros_like(a)
    for side in (-1.0, 1.0):
        ba, bb, thick = _brow_curve(side)
        order = np.argsort(ba)
        ba, bb, thick = ba[order], bb[order], thick[order]
        centre = np.interp(a, ba, bb)
        half = np.interp(a, ba, thick)
        along = _smoothstep(a, ba[0] - 2500.0, ba[0] + 1500.0)
        along *= 1.0 - _smoothstep(a, ba[-1] - 1500.0, ba[-1] + 1500.0)
        weight = np.maximum(weight, along * np.exp(-(np.abs((b - centre) / half) ** 2.5)))
    return weight * (depth > 30000.0)


class _Paint:
    """Per-vertex albedo kept as three parts, ``skin + hair + fixed``, so it can be recoloured."""

    def __init__(self, n: int) -> None:
        self.parts = np.zeros((3, n, 3))  # skin-toned, hair-toned, fixed (eyes, mouth, lashes)

    def blend(self, weight: np.ndarray, colour: np.ndarray, part: int) -> None:
        """Paint ``colour`` over everything with per-vertex opacity ``weight`` (N,)."""
        self.parts *= 1.0 - weight[None, :, None]
        self.parts[part] += weight[:, None] * colour

    def set(self, ids: np.ndarray, colour: np.ndarray, part: int) -> None:
        self.parts[:, ids] = 0.0
        self.parts[part, ids] = colour


_SKIN_PART, _HAIR_PART, _FIXED_PART = 0, 1, 2


def _regions_and_albedo(
    positions: np.ndarray, normals: np.ndarray, dirs: np.ndarray, tags: np.ndarray,
    extra: np.ndarray, a: np.ndarray, b: np.ndarray, depth: np.ndarray, rows: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Region ids (N,) int8 and albedo parts (3, N, 3): skin-toned, hair-toned, fixed; BGR."""
    n = len(positions)
    region = np.full(n, SyntheticHead.SKIN, dtype=np.int8)
    rng = np.random.default_rng(7)
    paint = _Paint(n)
    # Skin: slightly redder cheeks, slightly darker around the eyes, a little mottling.
    ab = np.stack([a, b])
    face = depth > 30000.0
    skin = np.tile(_SKIN, (n, 1))
    cheeks = sum(_gauss(ab, (s * 40000.0, -15000.0), (14000.0, 14000.0)) for s in (-1.0, 1.0))
    skin *= 1.0 - 0.06 * (cheeks * face)[:, None] * np.array([1.0, 1.0, -0.3])
    sockets = sum(_gauss(ab, (s * 31000.0, 26000.0), (12000.0, 8000.0)) for s in (-1.0, 1.0))
    skin *= 1.0 - 0.08 * (sockets * face)[:, None]
    skin *= 1.0 + rng.normal(0.0, 0.012, (n, 1))
    paint.parts[_SKIN_PART] = skin

    hair = _hair_weight(dirs)
    paint.blend(hair, 0.0, _HAIR_PART)
    paint.parts[_HAIR_PART] += hair[:, None] * _HAIR * (1.0 + rng.normal(0.0, 0.12, (n, 1)))
    region[hair > 0.5] = SyntheticHead.HAIR

    brow = _brow_weight(a, b, depth) * (1.0 - hair)
    paint.blend(0.9 * brow, _BROW, _HAIR_PART)
    region[brow > 0.5] = SyntheticHead.EYEBROW

    # Lips: inside the vermilion borders (pre-warp chart), borders partly blended.
    inside_lips = (
        (np.abs(a) < _MOUTH_OUTER)
        & (b <= _mouth_line(a) + _upper_lip_height(a) + 1.0)
        & (b >= _mouth_line(a) - _lower_lip_height(a) - 1.0)
        & face
    )
    lip_weight = np.where(inside_lips, 1.0, 0.0)
    lip_weight[tags == _TAG_LIP_BORDER] = 0.6
    paint.blend(lip_weight, _LIPS, _SKIN_PART)
    region[lip_weight > 0.5] = SyntheticHead.LIPS
    band = tags == _TAG_MOUTH_BAND
    interior = np.flatnonzero(band & (extra > 0.0) & (extra < 1.0))
    paint.set(interior, _MOUTH, _FIXED_PART)
    region[interior] = SyntheticHead.MOUTH_INTERIOR
    # Where the lips meet: a darker line while the mouth is shut.
    inner_edge = band & ((extra == 0.0) | (extra == 1.0))
    inner_edge = np.flatnonzero(inner_edge | (tags == _TAG_MOUTH_CORNER))
    paint.set(inner_edge, _LIPS * 0.75, _SKIN_PART)
    region[inner_edge] = SyntheticHead.LIPS

    # Nostrils: down-facing patches either side of the columella.
    x, y, z = positions.T
    for side in (-1.0, 1.0):
        patch = ((x - side * 6500.0) / 4200.0) ** 2 + ((y + 20500.0) / 2600.0) ** 2 < 1.0
        patch = np.flatnonzero(patch & (z > 95000.0) & (normals[1] < -0.35))
        paint.set(patch, 0.5 * (_NOSTRIL + _SKIN), _SKIN_PART)
        region[patch] = SyntheticHead.NOSTRIL

    # Eyes: sclera (darker toward the corners), iris and pupil; lash line on the upper margin.
    for side in (-1.0, 1.0):
        key = "eye_left" if side < 0 else "eye_right"
        eye = _eye_rows(side)
        order = np.argsort(eye["a"])
        mid_a = 0.5 * (eye["a"][0] + eye["a"][-1])
        half_width = 0.5 * abs(eye["a"][0] - eye["a"][-1])
        centre_b = 600.0 + 0.5 * (np.interp(mid_a, eye["a"][order], eye["lower"][order])
                                  + np.interp(mid_a, eye["a"][order], eye["upper"][order]))
        ids = np.concatenate([rows[f"{key}_{f}"] for f in _EYE_FRACTIONS])
        r = np.hypot(a[ids] - mid_a, b[ids] - centre_b)
        shade = 1.0 - 0.25 * _smoothstep(np.abs(a[ids] - mid_a) / half_width, 0.5, 1.0)
        paint.set(ids, 0.0, _FIXED_PART)
        paint.parts[_FIXED_PART, ids] = _SCLERA * shade[:, None]
        region[ids] = SyntheticHead.SCLERA
        paint.set(ids[r < _IRIS_RADIUS], _IRIS, _FIXED_PART)
        region[ids[r < _IRIS_RADIUS]] = SyntheticHead.IRIS
        paint.set(ids[r < _PUPIL_RADIUS], _PUPIL, _FIXED_PART)
        region[ids[r < _PUPIL_RADIUS]] = SyntheticHead.PUPIL
        paint.set(rows[key + "_upper"], _LASH, _FIXED_PART)
        region[rows[key + "_upper"]] = SyntheticHead.LASH
        paint.set(rows[key + "_lower"], _SKIN * np.array([0.85, 0.82, 0.95]), _SKIN_PART)
        paint.set(rows[key + "_corners"], _SKIN * np.array([0.75, 0.72, 0.92]), _SKIN_PART)
    return region, np.clip(paint.parts, 0.0, 1.0).astype(np.float32)


# -- identity and expression modes -------------------------------------------------------------


def _mirror_gauss(
    points: np.ndarray, centre: tuple[float, float, float], sigma: tuple[float, float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian bumps at ``centre`` (x > 0) and at its mirror: their sum and their difference
    (x > 0 one minus the other), both (N,); the difference is the smooth odd weight to use for
    sideways motion, so the midline never moves sideways."""
    right = _gauss(points, centre, sigma)
    left = _gauss(points, (-centre[0], centre[1], centre[2]), sigma)
    return right + left, right - left


def _softplus(x: np.ndarray, scale: float) -> np.ndarray:
    return scale * np.logaddexp(0.0, x / scale)


def _identity_fields(p: np.ndarray) -> np.ndarray:
    """40 raw identity displacement fields (40, 3, N) of the mean shape p (3, N), any scale."""
    x, y, z = p
    zero = np.zeros_like(x)
    front = _smoothstep(z, 0.0, 60000.0)
    fields = []

    def add(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray) -> None:
        fields.append(np.stack([dx + zero, dy + zero, dz + zero]))

    add(x, y - 10000.0, z - 10000.0)  # overall size
    add(zero, -_softplus(20000.0 - y, 8000.0), zero)  # face length: everything below the eyes
    add(x, zero, zero)  # head width
    depth = (z - 40000.0) * _smoothstep(z, 40000.0, 100000.0)
    add(zero, zero, depth)  # profile depth: features protrude more
    jaw = np.exp(-0.5 * ((y + 55000.0) / 22000.0) ** 2) * _smoothstep(z, 0.0, 40000.0)
    add(x * jaw, zero, zero)  # jaw width
    chin = _gauss(p, (0.0, -85000.0, 95000.0), (22000.0, 15000.0, 25000.0))
    add(zero, -0.4 * chin, chin)  # chin protrusion and length
    tip = _gauss(p, (0.0, -8000.0, 130000.0), (11000.0, 12000.0, 20000.0))
    add(zero, -tip, 0.2 * tip)  # nose length
    alae = _gauss(p, (0.0, -17000.0, 112000.0), (16000.0, 10000.0, 20000.0))
    add(x * alae, zero, zero)  # nose width
    add(zero, zero, _gauss(p, (0.0, -5000.0, 128000.0), (11000.0, 16000.0, 18000.0)))  # projection
    eyes, eyes_odd = _mirror_gauss(p, (31000.0, 26000.0, 92000.0), (12000.0, 10000.0, 20000.0))
    add(eyes_odd, zero, zero)  # eye spacing
    add(x * eyes - 31000.0 * eyes_odd, (y - 26000.0) * eyes, zero)  # eye size
    brows, _ = _mirror_gauss(p, (30000.0, 44000.0, 100000.0), (20000.0, 8000.0, 25000.0))
    add(zero, brows, zero)  # brow height
    lips = _gauss(p, (0.0, -45000.0, 104000.0), (19000.0, 8000.0, 15000.0))
    add(zero, 0.5 * (y + 44000.0) / 8000.0 * lips, lips)  # lip fullness
    cheeks, cheeks_odd = _mirror_gauss(p, (50000.0, -28000.0, 60000.0), (20000.0, 20000.0, 30000.0))
    add(cheeks_odd, zero, 0.6 * cheeks)  # cheek fullness
    forehead = np.maximum(y - 35000.0, 0.0) * _smoothstep(z, 30000.0, 90000.0)
    add(zero, zero, -forehead)  # forehead slope
    mouth = _gauss(p, (0.0, -43000.0, 100000.0), (28000.0, 9000.0, 25000.0))
    add(x * mouth, zero, zero)  # mouth width
    add(zero, zero, _gauss(p, (0.0, 16000.0, 116000.0), (7000.0, 12000.0, 15000.0)))  # nose bridge
    bones, bones_odd = _mirror_gauss(p, (46000.0, 5000.0, 80000.0), (14000.0, 10000.0, 25000.0))
    add(0.4 * bones_odd, 0.1 * bones, bones)  # cheekbones
    angle, angle_odd = _mirror_gauss(p, (58000.0, -50000.0, 25000.0), (18000.0, 18000.0, 25000.0))
    add(angle_odd, -0.2 * angle, zero)  # jaw angle

    # The rest: smooth random fields (fixed seed). Every third one is mirror-antisymmetric (the
    # face's asymmetry), the others mirror-symmetric; with no mixed field the basis stays closed
    # under mirroring, and Gram-Schmidt keeps each field's parity.
    rng = np.random.default_rng(20240611)
    face_ids = np.flatnonzero(front > 0.5)
    flip = np.array([-1.0, 1.0, 1.0])
    while len(fields) < NUM_SHAPE:
        parity = -1.0 if (len(fields) - 19) % 3 == 2 else 1.0
        field = np.zeros_like(p)
        for _ in range(2):
            centre = p[:, rng.choice(face_ids)]
            sigma = (rng.uniform(25000.0, 50000.0),) * 3
            vector = rng.normal(0.0, 1.0, 3)
            field += vector[:, None] * _gauss(p, tuple(centre), sigma)
            field += parity * (vector * flip)[:, None] * _gauss(p, tuple(centre * flip), sigma)
        fields.append(field)
    return np.stack(fields)


def _identity_basis(mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonalised identity basis (3, N, 40) and the coefficient prior std (40,)."""
    fields = _identity_fields(mean).reshape(NUM_SHAPE, -1)  # (40, 3N)
    # Modified Gram-Schmidt in definition order (each mode keeps its sign and, as far as the
    # earlier ones allow, its meaning). einsum rather than BLAS/LAPACK: bit-identical results
    # whatever the thread count, so datasets rendered by several processes match.
    columns = np.empty_like(fields)
    for k in range(NUM_SHAPE):
        vector = fields[k].copy()
        for j in range(k):
            vector -= np.einsum("i,i->", vector, columns[j]) * columns[j]
        columns[k] = vector / np.sqrt(np.einsum("i,i->", vector, vector))
    columns = columns.reshape(NUM_SHAPE, 3, -1)
    order = np.arange(1, NUM_SHAPE + 1, dtype=np.float64)
    # Shape_Para-like coefficient scale, and how far one std moves the face at most (over the
    # front of the head): the named modes by hand, the random ones decaying.
    std = 5.9e5 * order**-0.9
    displacement = np.concatenate([
        [7000.0, 5000.0, 4500.0, 4000.0, 3500.0, 3500.0, 3000.0, 2500.0, 3000.0, 2000.0,
         1500.0, 2500.0, 2000.0, 3500.0, 3500.0, 2500.0, 2000.0, 2500.0, 3000.0],
        2500.0 * (np.arange(NUM_SHAPE - 19) + 1.0) ** -0.3,
    ])
    front = mean[2] > 40000.0
    largest = np.max(np.linalg.norm(columns[:, :, front], axis=1), axis=1)
    basis = columns * (displacement / largest / std)[:, None, None]
    return np.moveaxis(basis, 0, -1), std


def _eye_closing(positions: np.ndarray, a: np.ndarray, b: np.ndarray, depth: np.ndarray,
                 rows: dict[str, np.ndarray], side: float) -> np.ndarray:
    """Displacement (N, 3) that shuts one eye: the opening collapses onto the lower lid margin and
    the upper lid skin follows, less and less up to 9000 units above the margin."""
    key = "eye_left" if side < 0 else "eye_right"
    out = np.zeros_like(positions)
    lower = rows[key + "_lower"]
    for name in [*(f"{key}_{f}" for f in _EYE_FRACTIONS), key + "_upper"]:
        ids = rows[name]
        out[ids] = positions[lower] - positions[ids]
    outer, inner = rows[key + "_corners"]
    column_a = np.concatenate([[a[outer]], a[lower], [a[inner]]])
    drop = np.vstack([np.zeros(3), positions[lower] - positions[rows[key + "_upper"]], np.zeros(3)])
    order = np.argsort(column_a)
    column_a, drop = column_a[order], drop[order]
    eye = _eye_rows(side)
    eye_order = np.argsort(eye["a"])
    margin = np.interp(a, eye["a"][eye_order], eye["upper"][eye_order])
    above = b - margin
    skin = ((a - column_a[0]) * (a - column_a[-1]) < 0) & (above > 0) & (above < 9000.0)
    skin &= depth > 0
    skin &= ~np.isin(np.arange(len(a)), np.concatenate([rows[key + "_upper"], lower]))
    falloff = (1.0 - above[skin] / 9000.0) ** 2
    for axis in range(3):
        out[skin, axis] = np.interp(a[skin], column_a, drop[:, axis]) * falloff
    return out


def _expression_basis(
    positions: np.ndarray, tags: np.ndarray, extra: np.ndarray, a: np.ndarray, b: np.ndarray,
    depth: np.ndarray, rows: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Expression basis (3, N, 10) and prior std (10,); see EXPRESSION_NAMES for the order."""
    p = positions.T
    x, y, z = p
    zero = np.zeros_like(x)
    std = np.array([1.5, 1.5, 1.2, 1.0, 1.2, 1.0, 0.4, 0.35, 1.0, 0.35])
    one_std = []  # each field is the deformation at one prior std

    # jaw_open: the mandible turns about a hinge in front of the ears; the lower lip, chin and
    # jaw follow it fully, the upper face not at all, with a seam only across the inner mouth.
    line = _mouth_line(a)
    softness = 600.0 + 9000.0 * _smoothstep(np.abs(a), 0.6 * _MOUTH_INNER, _MOUTH_INNER + 12000.0)
    front_chart = depth > 0.0
    below = np.where(front_chart, line - b, -(y + 43000.0))
    lowness = _smoothstep(below / softness, -1.0, 1.0)
    band = tags == _TAG_MOUTH_BAND
    half_gap = 0.5 * _mouth_gap(a)
    top = _smoothstep(-half_gap / softness, -1.0, 1.0)
    bottom = _smoothstep(half_gap / softness, -1.0, 1.0)
    lowness[band] = (1.0 - extra[band]) * top[band] + extra[band] * bottom[band]
    mandible = _smoothstep(z, -15000.0, 15000.0) * (1.0 - 0.7 * _smoothstep(-y, 85000.0, 125000.0))
    angle = 0.12  # radians at one std
    hinge_y, hinge_z = 12000.0, 0.0
    # Chin down and somewhat back (the condyles also glide forward, so less back than a pure turn).
    turn = np.stack([zero, -angle * (z - hinge_z), 0.5 * angle * (y - hinge_y)])
    jaw = turn * (lowness * mandible)
    # The band's middle rows sink into the mouth, so the opening reads as a cavity.
    cavity = 4.0 * extra * (1.0 - extra) * (bottom - top) * 16000.0
    jaw[2, band] -= cavity[band]
    jaw[1, band] += 0.15 * cavity[band]
    one_std.append(jaw)

    lips = _gauss(p, (0.0, -44000.0, 104000.0), (18000.0, 8000.0, 15000.0))
    corners, corners_odd = _mirror_gauss(p, (25000.0, -41500.0, 98000.0), (9000.0, 7000.0, 15000.0))
    cheeks, cheeks_odd = _mirror_gauss(p, (38000.0, -15000.0, 90000.0), (13000.0, 12000.0, 20000.0))
    lower_lids, _ = _mirror_gauss(p, (31000.0, 21000.0, 95000.0), (11000.0, 3000.0, 10000.0))
    # smile: corners up, out and back; cheeks and lower lids rise.
    one_std.append(np.stack([
        3000.0 * corners_odd + 600.0 * cheeks_odd + 0.06 * x * lips,
        4500.0 * corners + 2500.0 * cheeks + 1000.0 * lower_lids,
        -1500.0 * corners + 2000.0 * cheeks,
    ]))
    # frown: corners down, chin and lower lip pushed up.
    chin = _gauss(p, (0.0, -62000.0, 100000.0), (15000.0, 10000.0, 15000.0))
    one_std.append(np.stack([
        -500.0 * corners_odd, -4000.0 * corners + 1500.0 * chin, -500.0 * corners + 1500.0 * chin,
    ]))
    # lip_pucker: lips forward and narrower.
    one_std.append(np.stack([-0.3 * x * lips, zero, 6000.0 * lips]))
    # brow_raise: brows and upper lids up.
    brows, _ = _mirror_gauss(p, (28000.0, 46000.0, 100000.0), (22000.0, 9000.0, 30000.0))
    upper_lids, _ = _mirror_gauss(p, (31000.0, 32000.0, 95000.0), (12000.0, 4000.0, 15000.0))
    one_std.append(np.stack([zero, 5000.0 * brows + 1500.0 * upper_lids, zero]))
    # brow_furrow: inner brows down and together.
    inner, inner_odd = _mirror_gauss(p, (14000.0, 42000.0, 105000.0), (9000.0, 7000.0, 20000.0))
    one_std.append(np.stack([-2000.0 * inner_odd, -3500.0 * inner, 1000.0 * inner]))
    # eyes_close and the wink: lids shut (1.0 = closed), the wink raises that cheek a little.
    left = _eye_closing(positions, a, b, depth, rows, -1.0)
    closing = left + _eye_closing(positions, a, b, depth, rows, 1.0)
    one_std.append(closing.T * std[6])
    wink_cheek = _gauss(p, (-38000.0, -10000.0, 90000.0), (13000.0, 12000.0, 20000.0))
    wink = left.T + np.stack([zero, 2000.0 * wink_cheek, 1000.0 * wink_cheek])
    one_std.append(wink * std[7])
    # cheek_puff: cheeks out.
    puff, puff_odd = _mirror_gauss(p, (45000.0, -35000.0, 75000.0), (15000.0, 15000.0, 30000.0))
    one_std.append(np.stack([6000.0 * puff_odd, zero, 3500.0 * puff + 1500.0 * lips]))
    # wink_image_right: the mirror image of the wink.
    right = closing - left
    right_cheek = _gauss(p, (38000.0, -10000.0, 90000.0), (13000.0, 12000.0, 20000.0))
    one_std.append((right.T + np.stack([zero, 2000.0 * right_cheek, 1000.0 * right_cheek])) * std[9])

    fields = np.stack(one_std)  # (10, 3, N)
    return np.moveaxis(fields / std[:, None, None], 0, -1), std


def _vertex_mirror_ids(mean: np.ndarray, expression_basis: np.ndarray) -> np.ndarray:
    """Each vertex's mirror image (x -> -x) on the symmetric mesh.

    The mean shape stacks the collapsed inner-mouth band onto one line, so the match is made on
    the mouth opened by ``jaw_open`` (a symmetric mode), where every vertex stands apart.
    """
    opened = mean + expression_basis[:, :, EXPRESSION_NAMES.index("jaw_open")]  # (3, N)
    mirrored = opened * np.array([[-1.0], [1.0], [1.0]])
    _, ids = cKDTree(opened.T).query(mirrored.T)
    if not np.array_equal(np.sort(ids), np.arange(len(ids))):
        raise RuntimeError("synthetic head is not left/right symmetric: no vertex mirror found")
    return ids


def build_synthetic_head() -> SyntheticHead:
    """Build the procedural head (deterministic; see the module docstring).

    Returns:
        A :class:`SyntheticHead` whose model has 5802 vertices and 11600 triangles.
    """
    points, rows = _sample_points()
    dirs, tags, feat_a, feat_b, extra = points.arrays()
    triangles = _triangulate(dirs)
    positions, a, b, warped, depth = _mean_surface(dirs, tags, feat_a, feat_b)
    landmarks = _landmark_ids(positions, rows)
    normals = vertex_normals(positions.T, triangles)
    region, parts = _regions_and_albedo(positions, normals, dirs, tags, extra, a, b, depth, rows)
    albedo = np.clip(parts.sum(axis=0), 0.0, 1.0)
    shape_basis, shape_std = _identity_basis(positions.T)
    expression_basis, expression_std = _expression_basis(positions, tags, extra, a, b, depth, rows)
    model = MorphableModel(
        name="synthetic-head",
        mean=positions.T,
        shape_basis=shape_basis,
        expression_basis=expression_basis,
        landmark_indices=landmarks,
        triangles=triangles,
        mirror_ids=_vertex_mirror_ids(positions.T, expression_basis),
    )
    for name, basis, k in (
        ("shape", shape_basis, NUM_SHAPE), ("expression", expression_basis, NUM_EXPRESSION),
    ):
        rank = np.linalg.matrix_rank(basis.reshape(-1, k))
        if rank != k:
            raise RuntimeError(f"synthetic {name} basis has rank {rank}, expected {k}")
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
