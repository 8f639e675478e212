import numpy as np
import pytest

from models.frame import (
    crop_affine,
    crop_image,
    crop_to_image,
    detector_crop_box,
    image_to_crop,
    landmark_crop_box,
    nme,
    param_frame_to_crop,
)


def test_landmark_box_rule():
    points = np.array([[10.0, 50.0, 30.0], [20.0, 40.0, 100.0]])  # bbox 40 x 80, centre (30, 60)
    half = np.sqrt(2.0) * 40.0
    np.testing.assert_allclose(landmark_crop_box(points), [30 - half, 60 - half, 30 + half, 60 + half])
    with pytest.raises(ValueError, match="all points coincide"):
        landmark_crop_box(np.ones((2, 68)))


def test_detector_box_rule():
    # size = (100 + 120) / 2 = 110; centre (150, 260 + 0.14 * 110); side 1.58 * 110
    box = detector_crop_box(np.array([100.0, 200.0, 200.0, 320.0]))
    cy = 260 + 0.14 * 110
    np.testing.assert_allclose(box, [150 - 86.9, cy - 86.9, 150 + 86.9, cy + 86.9])
    with pytest.raises(ValueError, match="degenerate box"):
        detector_crop_box(np.array([5.0, 5.0, 5.0, 9.0]))


def test_crop_transforms_are_inverse_also_for_non_square_boxes():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 450, (3, 68))
    for box in (np.array([100.0, 50.0, 300.0, 250.0]), np.array([0.0, 10.0, 180.0, 250.0])):
        crop = image_to_crop(points, box)
        np.testing.assert_allclose(crop_to_image(crop, box), points, atol=1e-10)
    crop = image_to_crop(np.array([[100.0, 300.0], [50.0, 250.0]]), np.array([100.0, 50.0, 300.0, 250.0]))
    np.testing.assert_allclose(crop, [[0, 120], [0, 120]])


def test_param_frame_is_y_up_in_1_based_pixels():
    np.testing.assert_allclose(param_frame_to_crop(np.array([[5.0], [1.0], [0.0]])), [[5], [120], [0]])


def test_crop_image_puts_a_pixel_where_the_point_transform_says():
    image = np.zeros((450, 450, 3), np.uint8)
    image[200, 150] = 255  # array [row 200, col 150] = 1-based point (151, 201)
    box = np.array([121.0, 171.0, 241.0, 291.0])  # 120 px wide: scale 1
    crop = crop_image(image, box)
    x, y = image_to_crop(np.array([[151.0], [201.0]]), box)[:, 0]
    assert crop[int(y) - 1, int(x) - 1, 0] == 255 and crop.sum() == 255 * 3
    # At scale 2 the affine still maps array centres the same way.
    matrix = crop_affine(np.array([121.0, 171.0, 181.0, 231.0]))
    np.testing.assert_allclose(matrix @ [150, 200, 1], [2 * (151 - 121) - 1, 2 * (201 - 171) - 1])


def test_nme_normalises_by_the_truth_bbox():
    truth = np.array([[0.0, 40.0, 40.0, 0.0], [0.0, 0.0, 10.0, 10.0]])  # sqrt(40 * 10) = 20
    predicted = truth + np.array([[2.0], [0.0]])
    assert nme(predicted, truth) == pytest.approx(0.1)
    batch = nme(np.stack([predicted, truth]), np.stack([truth, truth]))
    np.testing.assert_allclose(batch, [0.1, 0.0])
