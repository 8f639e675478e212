"""The 68 iBUG 300-W landmarks as fixed vertices of the synthetic head.

Like 3DDFA's ``pt3d_68`` they are 3D surface points: the jaw points are fixed vertices on the
side of the face, not the silhouette. The image-left half (x <= 0) is placed by the tables below
(a target position, a point of the eyebrow curve, or a vertex of a feature row); the image-right
points of the jaw, brows and nostrils are the mirror images of their partners.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from models.morphable import NUM_LANDMARKS
from models.synthetic_face.chart import CENTRE, directions_from_chart
from models.synthetic_face.features import BAND_FRACTIONS, BROW_POINTS, EYE_SAMPLES, MOUTH_SAMPLES, brow_curve


class Target(NamedTuple):
    """A landmark placed at the vertex whose direction from CENTRE is nearest to a position."""

    landmark: int  # iBUG index (0-based)
    name: str
    position: tuple[float, float, float]  # model units, near the BFM's mean landmark


class RowPoint(NamedTuple):
    """A landmark placed on a vertex of a feature row (see ``mesh.sample_points``)."""

    landmark: int
    row: str
    index: int  # position along the row


# Targets on the midline (x = 0) only consider midline vertices, so they stay exactly symmetric.
_TARGETS = tuple(Target(*row) for row in (
    # landmark, name, position (x, y, z)
    (0, "jaw at the ear", (-73600.0, 18500.0, 17800.0)),
    (1, "jaw", (-72300.0, 0.0, 20500.0)),
    (2, "jaw", (-69000.0, -19000.0, 26000.0)),
    (3, "jaw", (-63500.0, -37500.0, 34000.0)),
    (4, "jaw", (-55000.0, -54500.0, 45000.0)),
    (5, "jaw", (-43000.0, -68500.0, 60000.0)),
    (6, "jaw", (-29500.0, -78500.0, 76000.0)),
    (7, "jaw", (-15000.0, -84500.0, 89000.0)),
    (8, "chin", (0.0, -86400.0, 96300.0)),
    (27, "nose bridge, top", (0.0, 26300.0, 111400.0)),
    (28, "nose bridge", (0.0, 17500.0, 117500.0)),
    (29, "nose bridge, low", (0.0, 8500.0, 124500.0)),
    (31, "nostril, outer", (-10500.0, -21000.0, 106000.0)),
    (32, "nostril", (-5200.0, -23500.0, 110000.0)),
    (33, "columella base", (0.0, -25000.0, 112000.0)),
))
_NOSE_TIP = 30  # the most forward vertex on the midline
_ON_MIDLINE = 1e-6  # |x| below which a vertex lies on the midline, model units
_EYEBROW_OFFSET = 1000.0  # eyebrow targets: this far from CENTRE toward the brow curve's chart points

# The image-right points, as the mirror image of their partner.
_MIRRORED = (
    # landmark, mirror of
    (9, 7), (10, 6), (11, 5), (12, 4), (13, 3), (14, 2), (15, 1), (16, 0),
    (22, 21), (23, 20), (24, 19), (25, 18), (26, 17),
    (34, 32), (35, 31),
)

# Eye rows run outer -> inner corner without the corners: the lid points sit at 1/3 and 2/3.
_THIRD = (EYE_SAMPLES - 1) // 3 - 1
_TWO_THIRDS = 2 * (EYE_SAMPLES - 1) // 3 - 1
# Lip rows run image-left -> image-right, 1600 chart units apart, without the corners.
_LIP_MIDLINE = (MOUTH_SAMPLES - 2) // 2
_LIP_SIDE = 10  # columns from the midline of 49, 53, 55, 59 (16000 units)
_LIP_PEAK = 4  # ... of 50, 52, 56, 58, the cupid's bow peaks and below them (6400 units)
_INNER_LIP_SIDE = 6  # ... of 61, 63, 65, 67 (9600 units)
_UPPER_INNER_LIP = "mouth_row0"  # the band's first row
_LOWER_INNER_LIP = f"mouth_row{len(BAND_FRACTIONS) - 1}"  # and its last

_ROW_POINTS = tuple(RowPoint(*row) for row in (
    # landmark, row, index along the row
    (36, "eye_left_corners", 0), (37, "eye_left_upper", _THIRD), (38, "eye_left_upper", _TWO_THIRDS),
    (39, "eye_left_corners", 1), (40, "eye_left_lower", _TWO_THIRDS), (41, "eye_left_lower", _THIRD),
    (42, "eye_right_corners", 1), (43, "eye_right_upper", _TWO_THIRDS), (44, "eye_right_upper", _THIRD),
    (45, "eye_right_corners", 0), (46, "eye_right_lower", _THIRD), (47, "eye_right_lower", _TWO_THIRDS),
    (48, "lip_corners", 0),
    (49, "lip_upper", _LIP_MIDLINE - _LIP_SIDE), (50, "lip_upper", _LIP_MIDLINE - _LIP_PEAK),
    (51, "lip_upper", _LIP_MIDLINE),
    (52, "lip_upper", _LIP_MIDLINE + _LIP_PEAK), (53, "lip_upper", _LIP_MIDLINE + _LIP_SIDE),
    (54, "lip_corners", 1),
    (55, "lip_lower", _LIP_MIDLINE + _LIP_SIDE), (56, "lip_lower", _LIP_MIDLINE + _LIP_PEAK),
    (57, "lip_lower", _LIP_MIDLINE),
    (58, "lip_lower", _LIP_MIDLINE - _LIP_PEAK), (59, "lip_lower", _LIP_MIDLINE - _LIP_SIDE),
    (60, "mouth_corners", 0),
    (61, _UPPER_INNER_LIP, _LIP_MIDLINE - _INNER_LIP_SIDE), (62, _UPPER_INNER_LIP, _LIP_MIDLINE),
    (63, _UPPER_INNER_LIP, _LIP_MIDLINE + _INNER_LIP_SIDE),
    (64, "mouth_corners", 1),
    (65, _LOWER_INNER_LIP, _LIP_MIDLINE + _INNER_LIP_SIDE), (66, _LOWER_INNER_LIP, _LIP_MIDLINE),
    (67, _LOWER_INNER_LIP, _LIP_MIDLINE - _INNER_LIP_SIDE),
))


def landmark_ids(positions: np.ndarray, rows: dict[str, np.ndarray]) -> np.ndarray:
    """The 68 iBUG landmark vertex ids (68,) int64, from mean positions (N, 3) and feature rows."""
    out = np.full(NUM_LANDMARKS, -1, dtype=np.int64)
    targets = np.array([target.position for target in _TARGETS])
    out[[target.landmark for target in _TARGETS]] = _nearest_direction(positions, targets)
    brow_a, brow_b, _ = brow_curve(-1.0)
    brow_targets = CENTRE + directions_from_chart(brow_a, brow_b) * _EYEBROW_OFFSET
    out[[point.landmark for point in BROW_POINTS]] = _nearest_direction(positions, brow_targets)
    midline = np.flatnonzero(np.abs(positions[:, 0]) < _ON_MIDLINE)
    out[_NOSE_TIP] = midline[np.argmax(positions[midline, 2])]
    landmarks, partners = (list(column) for column in zip(*_MIRRORED, strict=True))
    out[landmarks] = _mirror_ids(positions, out[partners])
    for point in _ROW_POINTS:
        out[point.landmark] = rows[point.row][point.index]
    assert np.all(out >= 0), "a landmark was left unplaced"
    return out


def _nearest_direction(positions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target (K, 3), the vertex in the direction nearest to it; midline targets (x = 0)
    only consider midline vertices, so that they stay exactly symmetric."""
    directions = positions - CENTRE
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wanted = targets - CENTRE
    wanted /= np.linalg.norm(wanted, axis=1, keepdims=True)
    found = cKDTree(directions).query(wanted)[1]
    on_midline = targets[:, 0] == 0.0
    if np.any(on_midline):
        midline = np.flatnonzero(np.abs(positions[:, 0]) < _ON_MIDLINE)
        found[on_midline] = midline[cKDTree(directions[midline]).query(wanted[on_midline])[1]]
    return found


def _mirror_ids(positions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The vertices at the x-mirrored positions of ``ids`` (the point set is mirror-symmetric)."""
    mirrored = positions[ids] * np.array([-1.0, 1.0, 1.0])
    distance, found = cKDTree(positions).query(mirrored)
    if np.any(distance > 1.0):
        raise RuntimeError(f"no mirror vertex within 1 unit for {ids[distance > 1.0]}")
    return found
