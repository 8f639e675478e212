"""Benchmark arithmetic: yaw bins, the bin-mean summary, AFLW's 21 points, rigid alignment."""

import math

import numpy as np
import pytest

from models.metrics import (
    AFLW21_FROM_68,
    aflw21_from_68,
    aflw2000_report,
    nme_21,
    reconstruction_nme,
    rigid_align,
    yaw_bins,
)
from models.params import rotation_from_angles


def test_yaw_bins_put_each_edge_in_the_lower_bin():
    yaw = np.array([0.0, 29.999, 30.0, 30.001, -45.0, 60.0, 60.001, -89.0, 90.0, 120.0])
    assert yaw_bins(yaw).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="NaN"):
        yaw_bins(np.array([np.nan]))


def test_report_takes_mean_and_population_std_of_the_bin_means():
    errors = [0.01, 0.03, 0.05, 0.02, 0.10, 0.04]
    yaws = [10.0, -30.0, 45.0, 60.0, 75.0, -90.0]
    stems = [f"image{i:05d}" for i in range(6)]
    report = aflw2000_report(np.array(errors), np.array(yaws), stems)
    # Written out by hand: bins {0.01, 0.03}, {0.05, 0.02}, {0.10, 0.04}.
    bin_means = [(0.01 + 0.03) / 2, (0.05 + 0.02) / 2, (0.10 + 0.04) / 2]
    mean = sum(bin_means) / 3
    std = math.sqrt(sum((m - mean) ** 2 for m in bin_means) / 3)
    assert set(report) == {"nme_mean_of_bins", "nme_std_of_bins", "nme_per_sample_mean", "bins", "per_image"}
    assert report["nme_mean_of_bins"] == pytest.approx(mean, rel=1e-12)
    assert report["nme_std_of_bins"] == pytest.approx(std, rel=1e-12)
    assert report["nme_per_sample_mean"] == pytest.approx(sum(errors) / 6, rel=1e-12)
    assert [row["range"] for row in report["bins"]] == ["[0,30]", "(30,60]", "(60,90]"]
    assert [row["count"] for row in report["bins"]] == [2, 2, 2]
    assert [row["mean"] for row in report["bins"]] == pytest.approx(bin_means, rel=1e-12)
    assert report["per_image"] == dict(zip(stems, errors, strict=True))


def test_report_of_an_empty_bin():
    report = aflw2000_report(np.array([0.02, 0.04]), np.array([5.0, 80.0]), ["a", "b"])
    assert report["bins"][1] == {"range": "(30,60]", "count": 0, "mean": None}
    assert report["nme_mean_of_bins"] == pytest.approx(0.03)
    with pytest.raises(ValueError, match="distinct"):
        aflw2000_report(np.array([0.02, 0.04]), np.array([5.0, 80.0]), ["a", "a"])


def test_68_to_21_averages_the_listed_points():
    landmarks = np.arange(2 * 68, dtype=np.float64).reshape(2, 68)
    points = aflw21_from_68(landmarks)
    assert points.shape == (2, 21) and len(AFLW21_FROM_68) == 21
    assert points[0, 0] == landmarks[0, 17]  # point 1 is landmark 18 (1-based)
    assert points[0, 7] == landmarks[0, 36:42].mean()  # the left eye's centre
    assert points[1, 18] == landmarks[1, 60:68].mean()  # the inner lips' centre


def test_21_point_nme_skips_missing_points():
    rng = np.random.default_rng(0)
    truth_68 = rng.uniform(100.0, 300.0, (2, 68))
    truth_21 = aflw21_from_68(truth_68)
    predicted = truth_68 + 1.0  # every point 1 px right and down: error sqrt(2)
    missing = truth_21.copy()
    missing[:, 3] = -1.0
    missing[0, 5] = -1.0  # one coordinate missing is enough (AFLW has such points)
    missing[:, 4] = predicted[:, 24] + 50.0  # a visible point, badly predicted
    visible = [k for k in range(21) if k not in (3, 5)]
    distances = np.linalg.norm(aflw21_from_68(predicted)[:, visible] - missing[:, visible], axis=0)
    extent_68 = truth_68.max(axis=1) - truth_68.min(axis=1)
    assert nme_21(predicted, missing, truth_68) == pytest.approx(
        distances.mean() / math.sqrt(extent_68[0] * extent_68[1]))
    shown = missing[:, visible]
    extent_21 = shown.max(axis=1) - shown.min(axis=1)
    normaliser_21 = math.sqrt(extent_21[0] * extent_21[1])
    assert nme_21(predicted, missing) == pytest.approx(distances.mean() / normaliser_21)
    with pytest.raises(ValueError, match="no visible"):
        nme_21(predicted, np.full((2, 21), -1.0))


def test_rigid_alignment_recovers_a_planted_motion():
    rng = np.random.default_rng(1)
    source = rng.normal(0.0, 50.0, (3, 200))
    rotation = rotation_from_angles(0.3, -1.1, 2.5)
    translation = np.array([12.0, -40.0, 7.5])
    target = rotation @ source + translation[:, None]
    found_rotation, found_translation = rigid_align(source, target)
    np.testing.assert_allclose(found_rotation, rotation, atol=1e-12)
    np.testing.assert_allclose(found_translation, translation, atol=1e-9)
    assert np.linalg.det(found_rotation) == pytest.approx(1.0)


def test_reconstruction_nme_of_a_moved_copy_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(2)
    mesh = rng.normal(0.0, 60.0, (3, 5802)) + np.array([[225.0], [225.0], [0.0]])
    landmarks = mesh[:, :68]
    moved = rotation_from_angles(0.2, 0.5, -0.1) @ mesh + np.array([[5.0], [-3.0], [80.0]])
    assert reconstruction_nme(moved, mesh, landmarks) == pytest.approx(0.0, abs=1e-12)
    noisy = moved + rng.normal(0.0, 2.0, moved.shape)
    assert reconstruction_nme(noisy, mesh, landmarks) > 0.005
