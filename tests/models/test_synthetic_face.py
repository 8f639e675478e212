"""The procedural synthetic head: arrays, mesh, landmarks, modes and colours."""

import hashlib

import numpy as np
import pytest

from models.params import rotation_from_angles
from models.synthetic_face import (
    EXPRESSION_NAMES,
    REGION_NAMES,
    SyntheticHead,
    build_synthetic_head,
)

# iBUG 68 (image-left, image-right) pairs (0-based) and the points on the midline.
MIRROR_PAIRS = [(i, 16 - i) for i in range(8)] + [
    (17, 26), (18, 25), (19, 24), (20, 23), (21, 22), (31, 35), (32, 34),
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
    (48, 54), (49, 53), (50, 52), (59, 55), (58, 56), (60, 64), (61, 63), (67, 65),
]
MIDLINE = [8, 27, 28, 29, 30, 33, 51, 57, 62, 66]
# The BFM's mean landmarks (3DDFA's trim) at a few points, and their overall ranges.
BFM_POINTS = {
    0: (-73587, 18534, 17761), 8: (-100, -86364, 96280), 16: (72560, 18478, 17913),
    27: (-261, 26333, 111411), 30: (-115, -7999, 131937), 36: (-43532, 25935, 87252),
    45: (42730, 25820, 87187), 48: (-25778, -41232, 99206), 54: (24596, -41268, 98994),
}
BFM_LOW = np.array([-73587.0, -86364.0, 17761.0])
BFM_HIGH = np.array([72560.0, 49141.0, 131937.0])
# sha256 of every array of the head (see head_digest), recorded when models.synthetic_face was a single
# module, before it became a package. A change of it is a change of every synthetic dataset.
HEAD_DIGEST = "9266a8c6a3aee82099b34a89ff836809b58fdca9dfb65227b12794755beb8315"


@pytest.fixture(scope="module")
def head() -> SyntheticHead:
    return build_synthetic_head()


def head_digest(head: SyntheticHead) -> str:
    """sha256 over (name, dtype, shape, bytes) of each array of the head, in a fixed order, then its
    names and neutral colours."""
    model = head.model
    arrays = {
        "model.mean": model.mean, "model.shape_basis": model.shape_basis,
        "model.expression_basis": model.expression_basis, "model.landmark_indices": model.landmark_indices,
        "model.triangles": model.triangles, "model.mirror_ids": model.mirror_ids,
        "shape_std": head.shape_std, "expression_std": head.expression_std,
        "vertex_albedo": head.vertex_albedo, "vertex_region": head.vertex_region,
        "albedo_parts": head.albedo_parts,
    }
    digest = hashlib.sha256()
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        for part in (name.encode(), array.dtype.str.encode(), str(array.shape).encode(), array.tobytes()):
            digest.update(part)
    names = (model.name, head.expression_names, head.NEUTRAL_SKIN_BGR, head.NEUTRAL_HAIR_BGR)
    digest.update(repr(names).encode())
    return digest.hexdigest()


def params_with(head: SyntheticHead, expression: dict[str, float] | None = None) -> np.ndarray:
    params = np.zeros(62)
    for name, value in (expression or {}).items():
        params[52 + head.expression_names.index(name)] = value
    return params


def test_arrays_have_the_documented_shapes(head):
    model = head.model
    n = model.num_vertices
    assert model.name == "synthetic-head"
    assert 3000 <= n <= 6000
    assert model.mean.shape == (3, n)
    assert model.shape_basis.shape == (3, n, 40) and model.expression_basis.shape == (3, n, 10)
    assert head.shape_std.shape == (40,) and head.expression_std.shape == (10,)
    assert head.vertex_albedo.shape == (n, 3) and head.vertex_albedo.dtype == np.float32
    assert head.vertex_region.shape == (n,) and head.vertex_region.dtype == np.int8
    assert 0.0 <= head.vertex_albedo.min() and head.vertex_albedo.max() <= 1.0
    assert set(np.unique(head.vertex_region)) == set(range(len(REGION_NAMES)))
    assert head.expression_names == EXPRESSION_NAMES and len(EXPRESSION_NAMES) == 10
    np.testing.assert_allclose(head.albedo_parts.sum(axis=0), head.vertex_albedo, atol=1e-6)


def test_bases_have_full_rank_and_shape_para_scale(head):
    model = head.model
    assert np.linalg.matrix_rank(model.shape_basis.reshape(-1, 40)) == 40
    assert np.linalg.matrix_rank(model.expression_basis.reshape(-1, 10)) == 10
    assert 5e5 < head.shape_std[0] < 7e5
    assert np.all(np.diff(head.shape_std) < 0)
    assert np.all((head.expression_std > 0.2) & (head.expression_std < 3.0))
    # One prior std moves the face by thousands of units, not by nothing nor by a head width.
    for k in (0, 10, 39):
        largest = np.linalg.norm(model.shape_basis[:, :, k] * head.shape_std[k], axis=0).max()
        assert 1000 < largest < 20000


def test_mesh_is_closed_and_counter_clockwise_from_outside(head):
    tris = head.model.triangles
    edges = np.concatenate([tris[:, [0, 1]], tris[:, [1, 2]], tris[:, [2, 0]]])
    forward = edges[:, 0] * head.model.num_vertices + edges[:, 1]
    backward = edges[:, 1] * head.model.num_vertices + edges[:, 0]
    assert np.unique(forward).size == forward.size  # each directed edge once ...
    assert np.isin(backward, forward).all()  # ... and its reverse in the neighbour
    v = head.model.mean
    v0, v1, v2 = (v[:, tris[:, k]] for k in range(3))
    signed_volume = np.einsum("ij,ij->", v0, np.cross(v1.T, v2.T).T) / 6.0
    assert signed_volume > 0
    assert head.model.num_vertices - forward.size // 2 + len(tris) == 2  # a sphere's Euler number


def test_landmarks_are_distinct_and_mirror_symmetric(head):
    ids = head.model.landmark_indices
    assert np.unique(ids).size == 68
    points = head.model.mean[:, ids]
    for left, right in MIRROR_PAIRS:
        np.testing.assert_allclose(points[:, right], points[:, left] * [-1, 1, 1], atol=1.0)
        assert points[0, left] < 0 < points[0, right]
    np.testing.assert_allclose(points[0, MIDLINE], 0.0, atol=1.0)


def test_landmarks_land_where_the_bfm_has_them(head):
    points = head.model.mean[:, head.model.landmark_indices]
    assert np.argmax(points[2]) == 30  # the nose tip is the most forward landmark
    size = BFM_HIGH - BFM_LOW
    np.testing.assert_array_less(np.abs(points.min(axis=1) - BFM_LOW), 0.15 * np.abs(BFM_LOW))
    np.testing.assert_array_less(np.abs(points.max(axis=1) - BFM_HIGH), 0.15 * np.abs(BFM_HIGH))
    for index, expected in BFM_POINTS.items():
        np.testing.assert_array_less(np.abs(points[:, index] - expected), 0.1 * size)
    # Semantic order: brows above eyes above nose tip above mouth above chin.
    heights = points[1, [19, 37, 30, 51, 57, 8]]
    assert np.all(np.diff(heights) < 0)


def test_jaw_open_uncovers_the_mouth_interior(head):
    model = head.model
    interior = np.flatnonzero(head.vertex_region == SyntheticHead.MOUTH_INTERIOR)
    tris = model.triangles[np.isin(model.triangles, interior).any(axis=1)]

    def band_area(shape: np.ndarray) -> float:
        v0, v1, v2 = (shape[:, tris[:, k]] for k in range(3))
        return float(np.linalg.norm(np.cross((v1 - v0).T, (v2 - v0).T), axis=1).sum() / 2)

    neutral = model.shapes(params_with(head))
    opened = model.shapes(params_with(head, {"jaw_open": head.expression_std[0]}))
    assert band_area(neutral) < 1.0  # collapsed: the lips meet
    assert band_area(opened) > 1e8  # open by about a centimetre over the mouth's width
    lips = model.landmark_indices[[62, 66]]
    assert np.linalg.norm(neutral[:, lips[0]] - neutral[:, lips[1]]) < 1.0
    gap = neutral[1, lips[1]] - opened[1, lips[1]] - (neutral[1, lips[0]] - opened[1, lips[0]])
    assert 5000 < gap < 30000


def test_eyes_close_and_wink_only_the_image_left_eye(head):
    model = head.model
    lid_pairs = [(37, 41), (38, 40), (43, 47), (44, 46)]

    def openings(expression: dict[str, float]) -> np.ndarray:
        shape = model.shapes(params_with(head, expression), model.landmark_indices)
        return np.array([shape[1, a] - shape[1, b] for a, b in lid_pairs])

    neutral = openings({})
    assert np.all(neutral > 4000)
    np.testing.assert_allclose(openings({"eyes_close": 1.0}), 0.0, atol=1.0)
    wink = openings({"wink_image_left": 1.0})
    np.testing.assert_allclose(wink[:2], 0.0, atol=100.0)  # the raised cheek nudges the lower lid
    np.testing.assert_allclose(wink[2:], neutral[2:], atol=1.0)
    assert np.all(openings({"eyes_close": -0.3}) > neutral)


def test_only_jaw_open_separates_the_collapsed_band(head):
    model = head.model
    # Vertices sharing a position in the mean: the band between the lips, collapsed.
    _, group, count = np.unique(model.mean.T, axis=0, return_inverse=True, return_counts=True)
    shared = count[group] > 1
    assert shared.sum() > 50
    for k, name in enumerate(head.expression_names):
        shape = model.shapes(params_with(head, {name: head.expression_std[k]}))
        moved = np.linalg.norm(shape - model.mean, axis=0)
        assert moved.max() > 1500, name  # visible at one std
        assert moved[model.mean[2] < -30000].max() < 100, name  # the back of the head stays
        spread = max(np.ptp(shape[:, (group == g) & shared], axis=1).max()
                     for g in np.unique(group[shared]))
        if name == "jaw_open":
            assert spread > 5000
        else:
            assert spread < 1.0, name


def test_colours_rescale_skin_and_hair_only(head):
    neutral = head.colours(np.array(head.NEUTRAL_SKIN_BGR), np.array(head.NEUTRAL_HAIR_BGR))
    np.testing.assert_allclose(neutral, head.vertex_albedo, atol=1e-6)
    dark = head.colours(np.array([0.2, 0.25, 0.35]), np.array([0.5, 0.5, 0.5]))
    region = head.vertex_region
    assert dark[region == SyntheticHead.SKIN].mean() < neutral[region == SyntheticHead.SKIN].mean()
    assert dark[region == SyntheticHead.HAIR].mean() > neutral[region == SyntheticHead.HAIR].mean()
    fixed = np.isin(region, [head.SCLERA, head.PUPIL, head.MOUTH_INTERIOR])
    np.testing.assert_allclose(dark[fixed], neutral[fixed], atol=1e-6)
    with pytest.raises(ValueError, match="skin_bgr"):
        head.colours(np.array([0.5, 0.5]), np.array([0.1, 0.1, 0.1]))


def test_landmarks_facing_camera_follow_the_yaw(head):
    model = head.model
    # Positive yaw (300W-LP convention) turns the x < 0 side (landmarks 0-7, 36, 48) away.
    cases = (
        (0.0, [], [30, 36, 39, 42, 45, 48, 51, 54]),
        (80.0, list(range(8)), [30, 42, 45, 54]),
        (-80.0, list(range(9, 17)), [30, 36, 39, 48]),
    )
    for yaw, hidden, seen in cases:
        rotation = rotation_from_angles(0.0, np.deg2rad(yaw), 0.0)
        vertices = 0.001 * rotation @ model.mean + 225.0
        vertices[1] = 451 - vertices[1]
        facing = head.landmark_facing_camera(vertices)
        assert facing.shape == (68,)
        assert not facing[hidden].any()
        assert facing[seen].all()
    with pytest.raises(ValueError, match="vertices must have shape"):
        head.landmark_facing_camera(np.zeros((3, 10)))


def test_build_is_deterministic(head):
    again = build_synthetic_head()
    assert again.model.identity == head.model.identity
    np.testing.assert_array_equal(again.vertex_albedo, head.vertex_albedo)
    np.testing.assert_array_equal(again.vertex_region, head.vertex_region)


def test_head_arrays_are_bit_identical_to_the_recorded_build(head):
    assert head_digest(head) == HEAD_DIGEST
