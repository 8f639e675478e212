import numpy as np
import pytest

from models.params import (
    NUM_PARAMS,
    ParamStats,
    angles_from_rotation,
    compose_params,
    pose_angles,
    rotation_from_angles,
    scale_rotation_from_camera,
    split_params,
)


def reference_rotation(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """The three matrices of the conventions doc, multiplied out plainly in float64."""
    c, s = np.cos(pitch), np.sin(pitch)
    rx = np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
    c, s = np.cos(yaw), np.sin(yaw)
    ry = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    c, s = np.cos(roll), np.sin(roll)
    rz = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])
    return rx @ ry @ rz


def test_rotation_matches_the_three_matrix_product():
    rng = np.random.default_rng(0)
    for pitch, yaw, roll in rng.uniform(-3, 3, size=(50, 3)):
        np.testing.assert_allclose(rotation_from_angles(pitch, yaw, roll),
                                   reference_rotation(pitch, yaw, roll), atol=1e-15)


def test_angles_round_trip_inside_the_canonical_range():
    rng = np.random.default_rng(1)
    angles = np.stack([rng.uniform(-np.pi, np.pi, 200), rng.uniform(-1.55, 1.55, 200),
                       rng.uniform(-np.pi, np.pi, 200)], axis=1)
    back = angles_from_rotation(rotation_from_angles(*angles.T))
    np.testing.assert_allclose(back, angles, atol=1e-12)


def test_gimbal_lock_still_reproduces_the_rotation():
    for yaw in (np.pi / 2, -np.pi / 2):
        rot = rotation_from_angles(0.3, yaw, -0.2)
        back = angles_from_rotation(rot)
        assert back[2] == 0.0
        np.testing.assert_allclose(rotation_from_angles(*back), rot, atol=1e-9)


def test_scale_rotation_split_of_a_scaled_rotation():
    rot = reference_rotation(0.1, -0.7, 0.25)
    scale, back = scale_rotation_from_camera(2.5e-3 * rot)
    assert scale == pytest.approx(2.5e-3, rel=1e-12)
    np.testing.assert_allclose(back, rot, atol=1e-12)


def test_split_and_compose_are_inverse_and_follow_the_layout():
    params = np.arange(NUM_PARAMS, dtype=np.float64)
    rot, t, shp, exp = split_params(params)
    np.testing.assert_array_equal(rot, [[0, 1, 2], [4, 5, 6], [8, 9, 10]])
    np.testing.assert_array_equal(t, [3, 7, 11])
    np.testing.assert_array_equal(shp, np.arange(12, 52))
    np.testing.assert_array_equal(exp, np.arange(52, 62))
    np.testing.assert_array_equal(compose_params(rot, t, shp, exp), params)


def test_pose_angles_of_a_batch():
    params = np.zeros((3, NUM_PARAMS))
    angles = np.array([[0.1, 0.2, 0.3], [-0.4, 1.2, 0.0], [0.0, -0.5, -1.0]])
    for i, a in enumerate(angles):
        params[i, :12] = np.concatenate([3.0 * rotation_from_angles(*a), np.ones((3, 1))], 1).ravel()
    np.testing.assert_allclose(pose_angles(params), angles, atol=1e-12)


def test_param_stats_whiten_round_trip_and_validation(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(5.0, 3.0, size=(500, NUM_PARAMS))
    stats = ParamStats.from_params(data)
    white = stats.whiten(data)
    np.testing.assert_allclose(white.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(white.std(0), 1, atol=1e-12)
    np.testing.assert_allclose(stats.dewhiten(white), data, atol=1e-12)
    assert ParamStats.from_dict(stats.to_dict()).identity == stats.identity
    np.savetxt(tmp_path / "mean.txt", stats.mean)
    np.savetxt(tmp_path / "std.txt", stats.std[:61])
    with pytest.raises(ValueError, match="std.txt: expected 62 numbers, found 61"):
        ParamStats.from_text_files(tmp_path / "mean.txt", tmp_path / "std.txt")
    with pytest.raises(ValueError, match="std must be > 0"):
        ParamStats(np.zeros(NUM_PARAMS), np.zeros(NUM_PARAMS))
