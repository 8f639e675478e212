"""62-d labels from .mat files and back, checked on the real AFLW2000-3D and 300W-LP files."""

import numpy as np
import pytest

from models.frame import landmark_crop_box, nme
from preprocessing.annotations import MatAnnotation, parse_mat
from preprocessing.datasets import list_aflw2000, read_annotation
from preprocessing.labels import (
    canonical_angles,
    crop_landmarks,
    image_landmarks,
    label_from_annotation,
    landmarks_in_image,
    pose_para_from_label,
)
from tests.conftest import shared_path

IMAGE_HEIGHT = 450  # both datasets


@pytest.fixture(scope="module")
def aflw2000_annotations():
    filesystem, refs = list_aflw2000(shared_path("aflw2000-3d", "mat"))
    return [read_annotation(filesystem, ref) for ref in refs]


def test_label_round_trip_on_all_aflw2000_files(bfm68, aflw2000_annotations):
    """Label -> 68 landmarks -> image reproduces pt3d_68 at the truncation floor (0.880%)."""
    errors, angle_errors, others = [], [], []
    for annotation in aflw2000_annotations:
        box = landmark_crop_box(annotation.pt3d_68)
        label = label_from_annotation(annotation, box, IMAGE_HEIGHT)
        errors.append(nme(landmarks_in_image(bfm68, label, box), annotation.pt3d_68))
        back = pose_para_from_label(label, box, IMAGE_HEIGHT)
        angle_errors.append(np.abs(back[:3] - canonical_angles(annotation.pose_para)).max())
        others.append(np.abs(back[3:6] - annotation.pose_para[3:6]).max())
    assert len(errors) == 2000
    assert np.mean(errors) <= 0.0090
    assert np.mean(errors) == pytest.approx(0.00880, abs=5e-5)
    assert max(angle_errors) < 0.01
    assert max(others) < 1e-6


def test_canonical_angles_only_rewrite_the_spelling(aflw2000_annotations):
    rewritten = 0
    for annotation in aflw2000_annotations:
        canonical = canonical_angles(annotation.pose_para)
        if not np.allclose(canonical, annotation.pose_para[:3], atol=1e-6):
            rewritten += 1
            assert abs(canonical[1]) <= np.pi / 2
    assert 0 < rewritten < 20  # a handful of real files spell the pose unusually


def test_300w_lp_sample_round_trip(bfm68):
    path = shared_path("300w-lp-sample", "IBUG_image_008_1_0.mat")
    annotation = parse_mat(path.read_bytes(), str(path))
    truth = image_landmarks(bfm68, annotation, IMAGE_HEIGHT)
    box = landmark_crop_box(truth)
    label = label_from_annotation(annotation, box, IMAGE_HEIGHT)
    np.testing.assert_allclose(landmarks_in_image(bfm68, label, box), truth, atol=1e-9)
    np.testing.assert_allclose(pose_para_from_label(label, box, IMAGE_HEIGHT), annotation.pose_para,
                               atol=1e-6)
    # The fitted model agrees with the hand-placed 2D points away from the (profile) jaw line;
    # a flipped axis or an off-by-a-pixel convention would not.
    assert nme(truth[:, 17:], annotation.pt2d[:, 17:]) < 0.04
    crop = crop_landmarks(bfm68, label)
    assert crop[:2].min() > 0 and crop[:2].max() < 121


def test_label_is_exact_for_a_non_square_box_and_random_pose(bfm68):
    rng = np.random.default_rng(0)
    for _ in range(20):
        annotation = MatAnnotation(
            path="random",
            pose_para=np.array([*rng.uniform(-1.2, 1.2, 3), *rng.uniform(150, 300, 2), -100.0,
                                rng.uniform(1e-3, 2e-3)]),
            shape_para=rng.normal(0, 3e5, 199), exp_para=rng.normal(0, 1, 29),
        )
        truth = image_landmarks(bfm68, annotation, IMAGE_HEIGHT)
        box = landmark_crop_box(truth) + rng.uniform(-10, 10, 4)
        label = label_from_annotation(annotation, box, IMAGE_HEIGHT)
        np.testing.assert_allclose(landmarks_in_image(bfm68, label, box), truth, atol=1e-8)
