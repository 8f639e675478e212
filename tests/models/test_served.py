"""The folder a registered model's pyfunc loads: crops in, the predictor's landmarks and pose out."""

import json

import cv2
import numpy as np
import pytest
import torch

from models import served
from models.architectures import build_model
from models.checkpoint import ModelBundle, bundle_to_dict
from models.frame import crop_image, image_to_crop
from models.params import ParamStats
from models.predictor import FacePredictor
from models.synthetic_face import build_synthetic_head


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    torch.manual_seed(0)
    network = build_model("mobile-frnet", 0.25).eval()
    head = build_synthetic_head()
    # A face of about 60 pixels' scale in the middle of the crop, as training's statistics give.
    mean = np.r_[5e-4, 0, 0, 60, 0, 5e-4, 0, 60, 0, 0, 5e-4, 0, np.zeros(50)]
    stats = ParamStats(mean + np.random.default_rng(0).normal(0, 1e-3, 62), np.full(62, 1e-4))
    bundle = ModelBundle("mobile-frnet", 0.25, network.state_dict(), stats, "synthetic", head.model.identity)
    folder = tmp_path_factory.mktemp("served")
    served.write_model_folder(folder, bundle_to_dict(bundle), head.model)
    return folder, FacePredictor(network, stats, head.model)


def test_answers_as_the_predictor_does_in_the_crops_pixels(written):
    folder, predictor = written
    model = served.load_model_folder(folder)
    image = np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    box = np.array([40.0, 60.0, 220.0, 240.0])
    expected = predictor.predict(image, box=box)
    for size in (120, 240):
        crop = crop_image(image, box, size)
        out = model.predict(np.stack([crop, crop]))
        assert {key: value.shape for key, value in out.items()} == {
            "landmarks": (2, 68, 2), "pose": (2, 3), "params": (2, 62)}
        if size == 120:  # the very crop the predictor made
            np.testing.assert_allclose(out["params"][0], expected.params, rtol=1e-9)
            np.testing.assert_allclose(out["landmarks"][1].T, image_to_crop(expected.landmarks, box)[:2],
                                       atol=1e-9)
            pitch, yaw, roll = np.degrees(expected.pose)
            np.testing.assert_allclose(out["pose"][0], [yaw, pitch, roll], atol=1e-9)
        else:  # resized to 120 first; points in the 240-pixel crop's own pixels
            resized = cv2.resize(crop, (120, 120), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_allclose(out["landmarks"][0], model.predict(resized)["landmarks"][0] * 2,
                                       atol=1e-9)


@pytest.mark.parametrize(("crops", "message"), [
    (np.zeros((120, 120), np.uint8), r"shape \(N, S, S, 3\), got \(120, 120\)"),
    (np.zeros((1, 120, 100, 3), np.uint8), r"got \(1, 120, 100, 3\)"),
    (np.full((1, 120, 120, 3), 300.0), r"whole-number pixel values 0..255 \(uint8\), got dtype float64"),
    (np.full((1, 120, 120, 3), 0.5, np.float32), "got dtype float32"),
    (np.full((1, 120, 120, 3), np.nan), "got dtype float64"),
    (np.ones((1, 120, 120, 3), bool), "got dtype bool"),
    (np.full((1, 120, 120, 3), 256, np.int64), r"pixel values 0..255 \(uint8\), got 256..256"),
    (np.zeros((1, 2, 2, 3), np.uint8), "crops of at least 32x32 pixels, got 2x2"),
    (np.zeros((1, 1, 1, 3), np.uint8), "crops of at least 32x32 pixels, got 1x1"),
    (np.zeros((65, 32, 32, 3), np.uint8), "at most 64 crops a call, got 65"),
])
def test_bad_crops_are_refused_with_their_shape(written, crops, message):
    with pytest.raises(ValueError, match=message):
        served.load_model_folder(written[0]).predict(crops)


def test_an_empty_batch_gives_empty_outputs_and_integer_pixels_equal_uint8(written):
    model = served.load_model_folder(written[0])
    empty = model.predict(np.zeros((0, 120, 120, 3), np.uint8))
    shapes = {"landmarks": (0, 68, 2), "pose": (0, 3), "params": (0, 62)}
    assert {k: v.shape for k, v in empty.items()} == shapes
    assert {k: v.shape for k, v in model.predict(np.array([])).items()} == shapes  # `{"inputs": []}`
    crop = np.random.default_rng(0).integers(0, 256, (1, 120, 120, 3))
    for name, expected in model.predict(crop.astype(np.uint8)).items():
        np.testing.assert_array_equal(model.predict(crop)[name], expected)  # int64, as a JSON body parses


def test_a_folder_whose_arrays_are_not_the_networks_morphable_model_is_refused(written, tmp_path):
    folder, _ = written
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in folder.iterdir():
        copy.joinpath(path.name).write_bytes(path.read_bytes())
    meta = json.loads((copy / served.META_FILE).read_text())
    arrays = dict(np.load(copy / meta["morphable_arrays"]))
    arrays["u"] = arrays["u"] + 1e-3
    np.savez(copy / meta["morphable_arrays"], **arrays)
    with pytest.raises(ValueError, match="the network was trained with synthetic-head@sha256"):
        served.load_model_folder(copy)
    meta["format"] = "something-else/9"
    (copy / served.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a mobile-frnet-served/1 model"):
        served.load_model_folder(copy)
