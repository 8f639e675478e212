"""The MTCNN face detector in torch: its networks against the mtcnn package's TensorFlow outputs,
real faces (boxes, five points, crops), no faces, two faces, bad inputs."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.frame import detector_crop_box, landmark_crop_box
from models.morphable import MorphableModel
from pipeline.predict import five_points
from preprocessing import mtcnn_detector
from preprocessing.annotations import parse_mat
from preprocessing.labels import image_landmarks
from preprocessing.mtcnn_detector import MtcnnFaceDetector, mtcnn_to_detector_boxes
from tests.conftest import box_iou, real_face_image, shared_path


@pytest.fixture(scope="module")
def detector() -> MtcnnFaceDetector:
    return MtcnnFaceDetector()


def read_mat(path: Path):
    return parse_mat(path.read_bytes(), str(path))


def pattern(height: int, width: int) -> torch.Tensor:
    """A fixed input (1, 3, H, W); the same NHWC array went through the package's Keras models."""
    i, j, c = np.meshgrid(np.arange(height), np.arange(width), np.arange(3), indexing="ij")
    image = (0.9 * np.sin(0.37 * i + 0.23 * j * (c + 1) + 1.3 * c)).astype(np.float32)
    return torch.from_numpy(image.transpose(2, 0, 1).copy())[None]




@torch.no_grad()
def test_networks_give_the_packages_tensorflow_outputs(detector):
    # Measured once with mtcnn 1.0.0's Keras models (TensorFlow 2.21) on the same inputs.
    offsets, probability = mtcnn_detector.pnet(pattern(16, 22), detector.weights["pnet"])
    assert probability.shape == (1, 3, 6)
    np.testing.assert_allclose(offsets[0, :, 0, 0], [-0.01172, -0.14628, -0.28707, -0.01625], atol=2e-5)
    np.testing.assert_allclose(probability[0, [0, 2, 2], [0, 4, 5]], [2.95964e-02, 2.86330e-04, 6.04452e-04],
                               rtol=1e-4)
    offsets, probability = mtcnn_detector.rnet(pattern(24, 24), detector.weights["rnet"])
    np.testing.assert_allclose(offsets[0], [-0.22328, -0.17618, -0.06309, 0.41895], atol=2e-5)
    np.testing.assert_allclose(probability, [8.380025e-4], rtol=1e-4)
    offsets, points, probability = mtcnn_detector.onet(pattern(48, 48), detector.weights["onet"])
    np.testing.assert_allclose(offsets[0], [0.03214, -0.08996, 0.02488, 0.15228], atol=2e-5)
    np.testing.assert_allclose(points[0], [0.32132, 0.66048, 0.26469, 0.08448, 0.36452,
                                           0.21649, 0.35099, 0.57701, 0.74539, 0.86882], atol=2e-5)
    np.testing.assert_allclose(probability, [1.2593255e-4], rtol=1e-4)


def test_keras_same_pooling_pads_the_odd_column_after():
    # 3-wide windows 2 apart give ceil(n / 2) outputs: over 22 columns one padded column after
    # the last, over 21 one on each side.
    for width, expected in ((22, [*range(2, 21, 2), 21]), (21, [*range(1, 20, 2), 20])):
        pooled = mtcnn_detector._max_pool_same(torch.arange(float(width)).reshape(1, 1, 1, width), 3, 2)
        np.testing.assert_array_equal(pooled[0, 0, 0], expected)


def test_onet_boxes_become_square_detector_boxes():
    boxes = mtcnn_to_detector_boxes(np.array([[10.0, 20.0, 110.0, 140.0]]))
    side = mtcnn_detector.MTCNN_TO_DETECTOR_SCALE * 110
    centre = np.array([60.0, 80.0 + mtcnn_detector.MTCNN_TO_DETECTOR_SHIFT * 110])
    np.testing.assert_allclose(boxes[0], [*(centre - side / 2), *(centre + side / 2)])
    assert mtcnn_to_detector_boxes(np.zeros((0, 4))).shape == (0, 4)


def check_face(detections, truth: np.ndarray, crop_iou: float) -> None:
    assert len(detections) == 1 and detections.boxes.dtype == np.float64
    assert detections.scores[0] > 0.9
    side = detections.boxes[0, 2] - detections.boxes[0, 0]
    errors = np.linalg.norm(detections.points[0] - five_points(truth), axis=1) / side
    # Measured: at most 0.064 / 0.069 of the box side, mean 0.035 / 0.040; flattening R-Net's and
    # O-Net's features in the wrong order gives up to 0.118 / 0.194, mean 0.090 / 0.139.
    assert errors.max() < 0.09 and errors.mean() < 0.055
    assert box_iou(detector_crop_box(detections.boxes[0]), landmark_crop_box(truth)) > crop_iou


def test_real_turned_face_300w_lp(detector):
    """300W-LP's sample, yaw -44 deg; truth: the 68 landmarks its parameters give through bfm68."""
    image_path = shared_path("300w-lp-sample", "IBUG_image_008_1_0.jpg")
    annotation = read_mat(image_path.with_suffix(".mat"))
    truth = image_landmarks(MorphableModel.from_bfm68_dir(shared_path("bfm68")), annotation, 450)
    # Measured: score 0.996, crop IoU 0.875 with the benchmark ROI.
    check_face(detector.detect(cv2.imread(str(image_path))), truth, crop_iou=0.8)


def test_real_near_frontal_face_aflw2000(detector):
    truth = read_mat(shared_path("aflw2000-3d", "mat", "image00427.mat")).pt3d_68
    # Measured: score 1.000, crop IoU 0.942 with the benchmark ROI.
    check_face(detector.detect(real_face_image()), truth, crop_iou=0.85)


def test_two_faces_largest_first(detector):
    face = real_face_image()
    canvas = np.zeros((450, 338 + 450, 3), np.uint8)
    canvas[:338, :338] = cv2.resize(face, (338, 338), interpolation=cv2.INTER_AREA)
    canvas[:, 338:] = face
    found = detector.detect(canvas)
    assert len(found) == 2 and found.points.shape == (2, 5, 2) and found.mtcnn_boxes.shape == (2, 4)
    sides = found.boxes[:, 2] - found.boxes[:, 0]
    assert sides[1] / sides[0] == pytest.approx(0.75, abs=0.05)
    assert found.boxes[1, 2] < 338 < found.boxes[0, 0]
    x = found.points[..., 0]
    assert np.all((x > found.boxes[:, None, 0]) & (x < found.boxes[:, None, 2]))


def test_nothing_on_blank_or_noise(detector):
    rng = np.random.default_rng(0)
    for image in (np.full((300, 400, 3), 128, np.uint8), np.zeros((60, 50, 3), np.uint8),
                  rng.integers(0, 256, (450, 450, 3), dtype=np.uint8),
                  cv2.GaussianBlur(rng.integers(0, 256, (500, 500, 3), dtype=np.uint8), (0, 0), 3)):
        found = detector.detect(image)
        assert len(found) == 0
        assert found.boxes.shape == (0, 4) and found.scores.shape == (0,) and found.points.shape == (0, 5, 2)
    # Smaller than the smallest face looked for: no pyramid level at all.
    assert len(detector.detect(np.zeros((30, 30, 3), np.uint8))) == 0


def test_bad_inputs_are_refused(detector, monkeypatch):
    with pytest.raises(ValueError, match=r"expected a BGR uint8 image \(H, W, 3\), got float32"):
        detector.detect(np.zeros((90, 90, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected a BGR uint8 image \(H, W, 3\), got uint8 \(90, 90\)"):
        detector.detect(np.zeros((90, 90), np.uint8))
    with pytest.raises(ValueError, match="min_face_size must be at least 12 pixels"):
        MtcnnFaceDetector(min_face_size=8)
    with pytest.raises(ValueError, match="thresholds must be three face probabilities"):
        MtcnnFaceDetector(thresholds=(0.6, 0.7))
    with pytest.raises(ValueError, match="thresholds must be three face probabilities"):
        MtcnnFaceDetector(thresholds=(0.6, 0.7, 1.0))
    with pytest.raises(ValueError, match=r"scale_factor must be in \(0, 1\)"):
        MtcnnFaceDetector(scale_factor=1.0)
    with pytest.raises(ValueError, match="no such MTCNN weight file"):
        MtcnnFaceDetector(weight_folder=Path("/nonexistent"))
    monkeypatch.setattr(mtcnn_detector.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install mtcnn==1\.0\.0"):
        MtcnnFaceDetector()
