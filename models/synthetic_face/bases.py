"""Identity and expression modes of the synthetic head.

Identity (``shape_basis``, 40 modes): the 19 named smooth deformations of
:data:`_NAMED_IDENTITY_MODES`, then 21 random low-frequency fields (fixed seed), orthogonalised in
that order; coefficients have 300W-LP's ``Shape_Para`` scale (``shape_std`` decays from 5.9e5).

Expression (``expression_basis``, 10 modes) in :data:`EXPRESSION_NAMES` order; coefficients are
O(1) and one prior standard deviation is a clearly visible expression. ``jaw_open`` is meant to be
>= 0 (a negative value pushes the lips through each other); ``eyes_close`` is 1.0 closed and
negative wide open; ``wink_image_left`` closes the eye with x < 0 (landmarks 36-41) and
``wink_image_right`` is its mirror image (the eye with x > 0, 42-47).

Both bases are closed under left/right mirroring: every identity mode is mirror-symmetric or
mirror-antisymmetric and the two winks mirror each other, so a mirrored face is again a face of
the model (:mod:`models.mirror`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from models.params import NUM_SHAPE
from models.synthetic_face.chart import Vec3, gauss, smoothstep
from models.synthetic_face.features import EYE_FRACTIONS, MOUTH_INNER, eye_rows, mouth_gap, mouth_line
from models.synthetic_face.mesh import VertexTag
from models.synthetic_face.surface import MeanSurface


class Blob(NamedTuple):
    """A Gaussian weight over model (x, y, z) that a mode moves."""

    name: str
    centre: Vec3  # model units; of the x > 0 one for a paired blob
    sigma: Vec3
    paired: bool  # one at each of -x and +x: weighs as their sum, and as "<name>_odd" their difference


class ExpressionMode(NamedTuple):
    name: str
    std: float  # prior standard deviation of its coefficient


# Identity modes in basis order: name, largest displacement over the front of the head at one
# prior std (model units). Their shapes are in _named_identity_fields.
_NAMED_IDENTITY_MODES = (
    ("size", 7000.0), ("face_length", 5000.0), ("head_width", 4500.0), ("profile_depth", 4000.0),
    ("jaw_width", 3500.0), ("chin", 3500.0), ("nose_length", 3000.0), ("nose_width", 2500.0),
    ("nose_projection", 3000.0), ("eye_spacing", 2000.0), ("eye_size", 1500.0),
    ("brow_height", 2500.0), ("lip_fullness", 2000.0), ("cheek_fullness", 3500.0),
    ("forehead_slope", 3500.0), ("mouth_width", 2500.0), ("nose_bridge", 2000.0),
    ("cheekbones", 2500.0), ("jaw_angle", 3000.0),
)
_IDENTITY_BLOBS = {blob.name: blob for blob in (Blob(*row) for row in (
    # name, centre (x, y, z), sigma (x, y, z), paired
    ("chin", (0.0, -85000.0, 95000.0), (22000.0, 15000.0, 25000.0), False),
    ("nose_tip", (0.0, -8000.0, 130000.0), (11000.0, 12000.0, 20000.0), False),
    ("alae", (0.0, -17000.0, 112000.0), (16000.0, 10000.0, 20000.0), False),
    ("nose_projection", (0.0, -5000.0, 128000.0), (11000.0, 16000.0, 18000.0), False),
    ("eyes", (31000.0, 26000.0, 92000.0), (12000.0, 10000.0, 20000.0), True),
    ("brows", (30000.0, 44000.0, 100000.0), (20000.0, 8000.0, 25000.0), True),
    ("lips", (0.0, -45000.0, 104000.0), (19000.0, 8000.0, 15000.0), False),
    ("cheeks", (50000.0, -28000.0, 60000.0), (20000.0, 20000.0, 30000.0), True),
    ("mouth", (0.0, -43000.0, 100000.0), (28000.0, 9000.0, 25000.0), False),
    ("nose_bridge", (0.0, 16000.0, 116000.0), (7000.0, 12000.0, 15000.0), False),
    ("cheekbones", (46000.0, 5000.0, 80000.0), (14000.0, 10000.0, 25000.0), True),
    ("jaw_angle", (58000.0, -50000.0, 25000.0), (18000.0, 18000.0, 25000.0), True),
))}
_SIZE_CENTRE = (0.0, 10000.0, 10000.0)  # the point "size" scales about
_BELOW_EYES = (20000.0, 8000.0)  # "face_length" moves what is below this y, softened over this much
_PROFILE_RAMP = (40000.0, 100000.0)  # "profile_depth" pushes out what is past this z, fully past that
_JAW_BAND = (-55000.0, 22000.0)  # "jaw_width" widens the face about this y, with this sigma ...
_JAW_FRONT = (0.0, 40000.0)  # ... from the ears (z) to the front
_LIP_PIVOT = -44000.0  # "lip_fullness" turns the lips outward about this y
_FOREHEAD = 35000.0  # "forehead_slope" leans back what is above this y ...
_FOREHEAD_FRONT = (30000.0, 90000.0)  # ... toward the front (z)

_RANDOM_FIELD_SEED = 20240611
_RANDOM_FIELD_BUMPS = 2  # Gaussian displacements (and their mirror images) per random field
_RANDOM_FIELD_SIGMA = (25000.0, 50000.0)  # uniform range of their sigma, model units
_FACE_RAMP = (0.0, 60000.0)  # z ramp from the ears to the face; bumps centre where it passes 1/2
_SHAPE_STD_FIRST = 5.9e5  # prior std of the first identity coefficient (300W-LP's Shape_Para scale)
_SHAPE_STD_DECAY = 0.9  # the k-th is _SHAPE_STD_FIRST * k^-decay
_RANDOM_DISPLACEMENT = (2500.0, 0.3)  # the k-th random mode moves the face by 2500 * k^-0.3 at one std
_FRONT_OF_HEAD = 40000.0  # displacements are measured where z is beyond this

EXPRESSION_MODES = tuple(ExpressionMode(*row) for row in (
    # name, prior std
    ("jaw_open", 1.5), ("smile", 1.5), ("frown", 1.2), ("lip_pucker", 1.0), ("brow_raise", 1.2),
    ("brow_furrow", 1.0), ("eyes_close", 0.4), ("wink_image_left", 0.35), ("cheek_puff", 1.0),
    ("wink_image_right", 0.35),
))
EXPRESSION_NAMES: tuple[str, ...] = tuple(mode.name for mode in EXPRESSION_MODES)
_EXPRESSION_BLOBS = {blob.name: blob for blob in (Blob(*row) for row in (
    # name, centre (x, y, z), sigma (x, y, z), paired
    ("lips", (0.0, -44000.0, 104000.0), (18000.0, 8000.0, 15000.0), False),
    ("corners", (25000.0, -41500.0, 98000.0), (9000.0, 7000.0, 15000.0), True),
    ("cheeks", (38000.0, -15000.0, 90000.0), (13000.0, 12000.0, 20000.0), True),
    ("lower_lids", (31000.0, 21000.0, 95000.0), (11000.0, 3000.0, 10000.0), True),
    ("chin", (0.0, -62000.0, 100000.0), (15000.0, 10000.0, 15000.0), False),
    ("brows", (28000.0, 46000.0, 100000.0), (22000.0, 9000.0, 30000.0), True),
    ("upper_lids", (31000.0, 32000.0, 95000.0), (12000.0, 4000.0, 15000.0), True),
    ("inner_brows", (14000.0, 42000.0, 105000.0), (9000.0, 7000.0, 20000.0), True),
    ("wink_cheek_left", (-38000.0, -10000.0, 90000.0), (13000.0, 12000.0, 20000.0), False),
    ("wink_cheek_right", (38000.0, -10000.0, 90000.0), (13000.0, 12000.0, 20000.0), False),
    ("puff", (45000.0, -35000.0, 75000.0), (15000.0, 15000.0, 30000.0), True),
))}

# jaw_open: the mandible turns about a hinge in front of the ears.
_JAW_ANGLE = 0.12  # radians at one prior std
_HINGE = (12000.0, 0.0)  # (y, z) of the hinge
_CONDYLE_GLIDE = 0.5  # chin moves back this fraction of a pure turn (the condyles glide forward)
_MANDIBLE_Z = (-15000.0, 15000.0)  # the mandible moves fully in front of this z range
_NECK_STAYS = (0.7, 85000.0, 125000.0)  # ... and 70% less below the chin, over this range of -y
_SEAM = (600.0, 9000.0)  # softness (chart b) of the seam across the mouth: midline, added near corners
_SEAM_WIDENS = (0.6, 12000.0)  # ... which widens from 0.6 MOUTH_INNER to MOUTH_INNER + 12000 in |a|
_MOUTH_Y = -43000.0  # y of the mouth, for vertices off the chart
_CAVITY_DEPTH = 16000.0  # how far the middle of the open band sinks into the mouth at one std
_CAVITY_LIFT = 0.15  # ... and rises, as a fraction of that
_LID_SKIN_REACH = 9000.0  # chart b above the upper lid margin up to which the skin follows a shut lid


def _weights(p: np.ndarray, blobs: dict[str, Blob]) -> dict[str, np.ndarray]:
    """Each blob's weight (N,) at points p (3, N), and "<name>_odd" for the paired ones."""
    out = {}
    for blob in blobs.values():
        if blob.paired:
            out[blob.name], out[blob.name + "_odd"] = _mirror_gauss(p, blob.centre, blob.sigma)
        else:
            out[blob.name] = gauss(p, blob.centre, blob.sigma)
    return out


def _mirror_gauss(p: np.ndarray, centre: Vec3, sigma: Vec3) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian bumps at ``centre`` (x > 0) and at its mirror: their sum and their difference
    (x > 0 one minus the other), both (N,); the difference is the smooth odd weight to use for
    sideways motion, so the midline never moves sideways."""
    right = gauss(p, centre, sigma)
    left = gauss(p, (-centre[0], centre[1], centre[2]), sigma)
    return right + left, right - left


def _softplus(x: np.ndarray, scale: float) -> np.ndarray:
    return scale * np.logaddexp(0.0, x / scale)


def _named_identity_fields(p: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
    """Displacements (dx, dy, dz), each (N,) or broadcastable, of the named identity modes at the
    mean shape p (3, N), any scale; the ratios inside a mode are its shape."""
    x, y, z = p
    zero = np.zeros_like(x)
    w = _weights(p, _IDENTITY_BLOBS)
    eye_x, eye_y, _ = _IDENTITY_BLOBS["eyes"].centre
    lip_sigma_y = _IDENTITY_BLOBS["lips"].sigma[1]
    jaw = np.exp(-0.5 * ((y - _JAW_BAND[0]) / _JAW_BAND[1]) ** 2) * smoothstep(z, *_JAW_FRONT)
    forehead = np.maximum(y - _FOREHEAD, 0.0) * smoothstep(z, *_FOREHEAD_FRONT)
    return {
        "size": (x, y - _SIZE_CENTRE[1], z - _SIZE_CENTRE[2]),
        "face_length": (zero, -_softplus(_BELOW_EYES[0] - y, _BELOW_EYES[1]), zero),
        "head_width": (x, zero, zero),
        "profile_depth": (zero, zero, (z - _PROFILE_RAMP[0]) * smoothstep(z, *_PROFILE_RAMP)),
        "jaw_width": (x * jaw, zero, zero),
        "chin": (zero, -0.4 * w["chin"], w["chin"]),  # protrusion and length
        "nose_length": (zero, -w["nose_tip"], 0.2 * w["nose_tip"]),
        "nose_width": (x * w["alae"], zero, zero),
        "nose_projection": (zero, zero, w["nose_projection"]),
        "eye_spacing": (w["eyes_odd"], zero, zero),
        "eye_size": (x * w["eyes"] - eye_x * w["eyes_odd"], (y - eye_y) * w["eyes"], zero),
        "brow_height": (zero, w["brows"], zero),
        "lip_fullness": (zero, 0.5 * (y - _LIP_PIVOT) / lip_sigma_y * w["lips"], w["lips"]),
        "cheek_fullness": (w["cheeks_odd"], zero, 0.6 * w["cheeks"]),
        "forehead_slope": (zero, zero, -forehead),
        "mouth_width": (x * w["mouth"], zero, zero),
        "nose_bridge": (zero, zero, w["nose_bridge"]),
        "cheekbones": (0.4 * w["cheekbones_odd"], 0.1 * w["cheekbones"], w["cheekbones"]),
        "jaw_angle": (w["jaw_angle_odd"], -0.2 * w["jaw_angle"], zero),
    }


def _random_identity_fields(p: np.ndarray, count: int) -> list[np.ndarray]:
    """``count`` smooth random fields (3, N) at the mean shape p (3, N) (fixed seed).

    Every third one is mirror-antisymmetric (the face's asymmetry), the others mirror-symmetric;
    with no mixed field the basis stays closed under mirroring, and Gram-Schmidt keeps each
    field's parity.
    """
    rng = np.random.default_rng(_RANDOM_FIELD_SEED)
    face_ids = np.flatnonzero(smoothstep(p[2], *_FACE_RAMP) > 0.5)
    flip = np.array([-1.0, 1.0, 1.0])
    fields = []
    for k in range(count):
        parity = -1.0 if k % 3 == 2 else 1.0
        field = np.zeros_like(p)
        for _ in range(_RANDOM_FIELD_BUMPS):
            centre = p[:, rng.choice(face_ids)]
            sigma = (rng.uniform(*_RANDOM_FIELD_SIGMA),) * 3
            vector = rng.normal(0.0, 1.0, 3)
            field += vector[:, None] * gauss(p, tuple(centre), sigma)
            field += parity * (vector * flip)[:, None] * gauss(p, tuple(centre * flip), sigma)
        fields.append(field)
    return fields


def _identity_fields(p: np.ndarray) -> np.ndarray:
    """40 raw identity displacement fields (40, 3, N) of the mean shape p (3, N), any scale."""
    zero = np.zeros_like(p[0])
    named = _named_identity_fields(p)
    fields = [np.stack([dx + zero, dy + zero, dz + zero])
              for dx, dy, dz in (named[name] for name, _ in _NAMED_IDENTITY_MODES)]
    fields += _random_identity_fields(p, NUM_SHAPE - len(fields))
    return np.stack(fields)


def _orthonormal(fields: np.ndarray) -> np.ndarray:
    """Modified Gram-Schmidt of the rows of ``fields`` (K, D), in order: each mode keeps its sign
    and, as far as the earlier ones allow, its meaning. einsum rather than BLAS/LAPACK: bit-identical
    results whatever the thread count, so datasets rendered by several processes match."""
    columns = np.empty_like(fields)
    for k in range(len(fields)):
        vector = fields[k].copy()
        for j in range(k):
            vector -= np.einsum("i,i->", vector, columns[j]) * columns[j]
        columns[k] = vector / np.sqrt(np.einsum("i,i->", vector, vector))
    return columns


def identity_basis(mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Identity basis (3, N, 40) and the coefficient prior std (40,) of the mean shape (3, N)."""
    columns = _orthonormal(_identity_fields(mean).reshape(NUM_SHAPE, -1)).reshape(NUM_SHAPE, 3, -1)
    order = np.arange(1, NUM_SHAPE + 1, dtype=np.float64)
    std = _SHAPE_STD_FIRST * order**-_SHAPE_STD_DECAY
    named = len(_NAMED_IDENTITY_MODES)
    scale, decay = _RANDOM_DISPLACEMENT
    displacement = np.concatenate([
        [largest for _, largest in _NAMED_IDENTITY_MODES],
        scale * (np.arange(NUM_SHAPE - named) + 1.0) ** -decay,
    ])
    front = mean[2] > _FRONT_OF_HEAD
    largest = np.max(np.linalg.norm(columns[:, :, front], axis=1), axis=1)
    basis = columns * (displacement / largest / std)[:, None, None]
    return np.moveaxis(basis, 0, -1), std


def expression_basis(surface: MeanSurface) -> tuple[np.ndarray, np.ndarray]:
    """Expression basis (3, N, 10) and prior std (10,); see EXPRESSION_NAMES for the order."""
    std = np.array([mode.std for mode in EXPRESSION_MODES])
    one_std = _expression_fields(surface, dict(zip(EXPRESSION_NAMES, std, strict=True)))
    fields = np.stack([one_std[name] for name in EXPRESSION_NAMES])  # (10, 3, N)
    return np.moveaxis(fields / std[:, None, None], 0, -1), std


def _expression_fields(surface: MeanSurface, std: dict[str, float]) -> dict[str, np.ndarray]:
    """Each expression mode's deformation (3, N) at one prior std, by name."""
    p = surface.positions.T
    x = p[0]
    zero = np.zeros_like(x)
    w = _weights(p, _EXPRESSION_BLOBS)
    left = _eye_closing(surface, -1.0)
    closing = left + _eye_closing(surface, 1.0)
    right = closing - left
    return {
        "jaw_open": _jaw_open(surface),
        # corners up, out and back; cheeks and lower lids rise.
        "smile": np.stack([
            3000.0 * w["corners_odd"] + 600.0 * w["cheeks_odd"] + 0.06 * x * w["lips"],
            4500.0 * w["corners"] + 2500.0 * w["cheeks"] + 1000.0 * w["lower_lids"],
            -1500.0 * w["corners"] + 2000.0 * w["cheeks"],
        ]),
        # corners down, chin and lower lip pushed up.
        "frown": np.stack([
            -500.0 * w["corners_odd"], -4000.0 * w["corners"] + 1500.0 * w["chin"],
            -500.0 * w["corners"] + 1500.0 * w["chin"],
        ]),
        # lips forward and narrower.
        "lip_pucker": np.stack([-0.3 * x * w["lips"], zero, 6000.0 * w["lips"]]),
        # brows and upper lids up.
        "brow_raise": np.stack([zero, 5000.0 * w["brows"] + 1500.0 * w["upper_lids"], zero]),
        # inner brows down and together.
        "brow_furrow": np.stack([
            -2000.0 * w["inner_brows_odd"], -3500.0 * w["inner_brows"], 1000.0 * w["inner_brows"],
        ]),
        # lids shut (1.0 = closed); a wink also raises that cheek a little.
        "eyes_close": closing.T * std["eyes_close"],
        "wink_image_left": (left.T + np.stack([
            zero, 2000.0 * w["wink_cheek_left"], 1000.0 * w["wink_cheek_left"],
        ])) * std["wink_image_left"],
        # cheeks out.
        "cheek_puff": np.stack([6000.0 * w["puff_odd"], zero, 3500.0 * w["puff"] + 1500.0 * w["lips"]]),
        "wink_image_right": (right.T + np.stack([
            zero, 2000.0 * w["wink_cheek_right"], 1000.0 * w["wink_cheek_right"],
        ])) * std["wink_image_right"],
    }


def _jaw_open(surface: MeanSurface) -> np.ndarray:
    """jaw_open at one std (3, N): the lower lip, chin and jaw follow the mandible's turn fully,
    the upper face not at all, with a seam only across the inner mouth."""
    a, b, depth, tags, extra = surface.a, surface.b, surface.depth, surface.tags, surface.extra
    _, y, z = surface.positions.T
    zero = np.zeros_like(y)
    softness = _SEAM[0] + _SEAM[1] * smoothstep(
        np.abs(a), _SEAM_WIDENS[0] * MOUTH_INNER, MOUTH_INNER + _SEAM_WIDENS[1])
    below = np.where(depth > 0.0, mouth_line(a) - b, -(y - _MOUTH_Y))
    lowness = smoothstep(below / softness, -1.0, 1.0)
    band = tags == VertexTag.MOUTH_BAND
    half_gap = 0.5 * mouth_gap(a)
    top = smoothstep(-half_gap / softness, -1.0, 1.0)
    bottom = smoothstep(half_gap / softness, -1.0, 1.0)
    lowness[band] = (1.0 - extra[band]) * top[band] + extra[band] * bottom[band]
    neck_share, neck_from, neck_to = _NECK_STAYS
    mandible = smoothstep(z, *_MANDIBLE_Z) * (1.0 - neck_share * smoothstep(-y, neck_from, neck_to))
    hinge_y, hinge_z = _HINGE
    # Chin down and somewhat back.
    turn = np.stack([zero, -_JAW_ANGLE * (z - hinge_z), _CONDYLE_GLIDE * _JAW_ANGLE * (y - hinge_y)])
    jaw = turn * (lowness * mandible)
    # The band's middle rows sink into the mouth, so the opening reads as a cavity.
    cavity = 4.0 * extra * (1.0 - extra) * (bottom - top) * _CAVITY_DEPTH
    jaw[2, band] -= cavity[band]
    jaw[1, band] += _CAVITY_LIFT * cavity[band]
    return jaw


def _eye_closing(surface: MeanSurface, side: float) -> np.ndarray:
    """Displacement (N, 3) that shuts one eye: the opening collapses onto the lower lid margin and
    the upper lid skin follows, less and less up to _LID_SKIN_REACH above the margin."""
    positions, a, b, rows = surface.positions, surface.a, surface.b, surface.rows
    key = "eye_left" if side < 0 else "eye_right"
    out = np.zeros_like(positions)
    lower = rows[key + "_lower"]
    for name in [*(f"{key}_{f}" for f in EYE_FRACTIONS), key + "_upper"]:
        out[rows[name]] = positions[lower] - positions[rows[name]]
    outer, inner = rows[key + "_corners"]
    column_a = np.concatenate([[a[outer]], a[lower], [a[inner]]])
    drop = np.vstack([np.zeros(3), positions[lower] - positions[rows[key + "_upper"]], np.zeros(3)])
    order = np.argsort(column_a)
    column_a, drop = column_a[order], drop[order]
    eye = eye_rows(side)
    eye_order = np.argsort(eye["a"])
    above = b - np.interp(a, eye["a"][eye_order], eye["upper"][eye_order])
    skin = ((a - column_a[0]) * (a - column_a[-1]) < 0) & (above > 0) & (above < _LID_SKIN_REACH)
    skin &= surface.depth > 0
    skin &= ~np.isin(np.arange(len(a)), np.concatenate([rows[key + "_upper"], lower]))
    falloff = (1.0 - above[skin] / _LID_SKIN_REACH) ** 2
    for axis in range(3):
        out[skin, axis] = np.interp(a[skin], column_a, drop[:, axis]) * falloff
    return out


def vertex_mirror_ids(mean: np.ndarray, expression_basis: np.ndarray) -> np.ndarray:
    """Each vertex's mirror image (x -> -x) on the symmetric mesh (N,), from the mean (3, N).

    The mean shape stacks the collapsed inner-mouth band onto one line, so the match is made on
    the mouth opened by ``jaw_open`` (a symmetric mode), where every vertex stands apart.
    """
    opened = mean + expression_basis[:, :, EXPRESSION_NAMES.index("jaw_open")]  # (3, N)
    mirrored = opened * np.array([[-1.0], [1.0], [1.0]])
    _, ids = cKDTree(opened.T).query(mirrored.T)
    if not np.array_equal(np.sort(ids), np.arange(len(ids))):
        raise RuntimeError("synthetic head is not left/right symmetric: no vertex mirror found")
    return ids

