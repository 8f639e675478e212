"""Horizontal flip of the 62-d label: landmarks of the mirrored label = mirrored landmarks."""

import numpy as np
import pytest

from models.frame import param_frame_to_crop
from models.mirror import mirror_map, mirror_params
from models.morphable import IBUG_MIRROR_IDS, MorphableModel, MorphableModelError
from models.params import pose_angles, rotation_from_angles
from models.synthetic_face import build_synthetic_head
from tests.conftest import shared_path


def random_label(rng: np.random.Generator, shape_std: np.ndarray, expression_std: np.ndarray):
    angles = rng.uniform([-0.4, -1.4, -0.4], [0.4, 1.4, 0.4])
    camera = np.concatenate([8e-4 * rotation_from_angles(*angles), [[60.0], [60.0], [-50.0]]], axis=1)
    alphas = [rng.normal(size=40) * shape_std, rng.normal(size=10) * expression_std]
    return np.concatenate([camera.ravel(), *alphas])


def flipped_crop_landmarks(model: MorphableModel, label: np.ndarray) -> np.ndarray:
    """Reference: the crop landmarks mirrored in x (1-based: x -> 121 - x) and renumbered."""
    points = param_frame_to_crop(model.landmarks(label))[:, IBUG_MIRROR_IDS]
    points[0] = 121 - points[0]
    return points


def test_ibug_mirror_is_an_involution_pairing_the_right_points():
    assert np.array_equal(IBUG_MIRROR_IDS[IBUG_MIRROR_IDS], np.arange(68))
    pairs = {0: 16, 8: 8, 17: 26, 30: 30, 36: 45, 39: 42, 48: 54, 51: 51, 60: 64, 66: 66}
    for a, b in pairs.items():
        assert IBUG_MIRROR_IDS[a] == b


def test_synthetic_head_flips_exactly():
    head = build_synthetic_head()
    mapping = mirror_map(head.model)
    assert mapping.residual < 1e-6
    rng = np.random.default_rng(0)
    for _ in range(10):
        label = random_label(rng, head.shape_std, head.expression_std)
        flipped = mirror_params(label, mapping)
        np.testing.assert_allclose(param_frame_to_crop(head.model.landmarks(flipped))[:2],
                                   flipped_crop_landmarks(head.model, label)[:2], atol=1e-6)
        np.testing.assert_allclose(pose_angles(flipped), pose_angles(label) * [1, -1, -1], atol=1e-9)
        np.testing.assert_allclose(mirror_params(flipped, mapping), label, rtol=1e-6, atol=1e-6)


def test_bfm68_flip_is_close_and_says_how_close(bfm68):
    mapping = mirror_map(bfm68)
    assert 100 < mapping.residual < 2000  # the real BFM is nearly, not exactly, symmetric
    rng = np.random.default_rng(1)
    shape_std = np.loadtxt(shared_path("bfm68", "param_std.txt"))[12:52]
    errors = []
    for _ in range(20):
        label = random_label(rng, shape_std, np.ones(10))
        flipped = param_frame_to_crop(bfm68.landmarks(mirror_params(label, mapping)))
        errors.append(np.abs(flipped[:2] - flipped_crop_landmarks(bfm68, label)[:2]).max())
    assert max(errors) < 2.0  # crop pixels, for a face ~110 px wide


def test_mirror_ids_are_validated_and_required(bfm68):
    with pytest.raises(MorphableModelError, match="mirror_ids must be an involution"):
        MorphableModel(name="m", mean=np.zeros((3, 68)), shape_basis=np.zeros((3, 68, 40)),
                       expression_basis=np.zeros((3, 68, 10)), landmark_indices=np.arange(68),
                       mirror_ids=np.roll(np.arange(68), 1))
    dense = MorphableModel.from_dense_subset(shared_path("bfm_subset", "bfm_4096.npz"), bfm68)
    with pytest.raises(ValueError, match="no left/right vertex correspondence"):
        mirror_map(dense)
