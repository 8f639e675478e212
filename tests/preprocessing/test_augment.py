"""Every geometric augmentation moves the label with the image; photometric ones leave it."""

import cv2
import numpy as np
import pytest
import scipy.ndimage

from models.frame import landmark_crop_box
from models.mirror import mirror_map
from preprocessing.augment import (
    AugmentConfig,
    GeometricConfig,
    PhotometricConfig,
    augment,
    expected_crop_landmarks,
    gaussian_blur,
    photometric,
    plan_crops,
    render_crops,
)
from preprocessing.datasets import list_300w_lp, read_annotation, read_image
from preprocessing.labels import annotation_arrays, crop_landmarks, image_landmarks, labels_from_poses
from preprocessing.synth import SynthConfig, generate

NO_PHOTOMETRIC = PhotometricConfig(brightness=0, contrast=0, colour=0, blur_probability=0,
                                   noise_probability=0, occlusion_probability=0)
ONLY = {
    "scale": GeometricConfig(scale_jitter=0.3, shift_jitter=0, rotation_deg=0, flip_probability=0),
    "shift": GeometricConfig(scale_jitter=0, shift_jitter=0.3, rotation_deg=0, flip_probability=0),
    "rotation": GeometricConfig(scale_jitter=0, shift_jitter=0, rotation_deg=45, flip_probability=0),
    "flip": GeometricConfig(scale_jitter=0, shift_jitter=0, rotation_deg=0, flip_probability=1.0),
    "all": GeometricConfig(scale_jitter=0.2, shift_jitter=0.2, rotation_deg=30, flip_probability=0.5),
}


@pytest.fixture(scope="module")
def faces(tmp_path_factory, synthetic_head):
    root = tmp_path_factory.mktemp("300W_LP")
    generate(SynthConfig("300w-lp", n=6, seed=11, views_per_face=3), root)
    filesystem, refs = list_300w_lp(root)
    out = []
    for ref in refs:
        annotation, image = read_annotation(filesystem, ref), read_image(filesystem, ref)
        out.append((image, annotation, image_landmarks(synthetic_head.model, annotation, image.shape[0])))
    return out


@pytest.mark.parametrize("kind", list(ONLY))
def test_label_follows_each_geometric_augmentation(faces, synthetic_head, kind):
    config = AugmentConfig(copies=5, keep_original=False, geometric=ONLY[kind],
                           photometric=NO_PHOTOMETRIC)
    mirror = mirror_map(synthetic_head.model)
    rng = np.random.default_rng(3)
    worst = 0.0
    for image, annotation, truth in faces:
        for crop in augment(image, annotation, landmark_crop_box(truth), config, rng, mirror):
            predicted = crop_landmarks(synthetic_head.model, crop.label)
            worst = max(worst, np.abs(predicted[:2] - expected_crop_landmarks(truth, crop)[:2]).max())
            if kind == "flip":
                assert crop.flipped
    assert worst <= 0.5
    assert worst < 1e-6  # the synthetic head makes every transform exact


def test_augmented_pixels_match_the_label(faces, synthetic_head):
    """The crop really moves: the transformed image equals a plain crop pushed through the same
    transform (checked on the flip, which must mirror the plain crop pixel for pixel)."""
    image, annotation, truth = faces[0]
    box = landmark_crop_box(truth)
    mirror = mirror_map(synthetic_head.model)
    plain = augment(image, annotation, box, AugmentConfig(copies=1), np.random.default_rng(0), mirror)[0]
    config = AugmentConfig(copies=1, keep_original=False, geometric=ONLY["flip"], photometric=NO_PHOTOMETRIC)
    flipped = augment(image, annotation, box, config, np.random.default_rng(0), mirror)[0]
    np.testing.assert_array_equal(flipped.image, plain.image[:, ::-1])


def test_photometric_changes_pixels_only(faces, synthetic_head):
    image, annotation, truth = faces[1]
    box = landmark_crop_box(truth)
    geometric = GeometricConfig(scale_jitter=0, shift_jitter=0, rotation_deg=0, flip_probability=0)
    strong = PhotometricConfig(blur_probability=1, noise_probability=1, occlusion_probability=1)
    config = AugmentConfig(copies=3, keep_original=True, geometric=geometric, photometric=strong)
    crops = augment(image, annotation, box, config, np.random.default_rng(5), None)
    for crop in crops[1:]:
        np.testing.assert_allclose(crop.label, crops[0].label, atol=1e-9)
        assert np.abs(crop.image.astype(int) - crops[0].image).mean() > 2.0


def test_photometric_strengths_match_the_config():
    """Each photometric change does what its setting says, measured on a flat grey crop: the
    additive noise has the drawn sigma and differs from crop to crop (windows of one noise field),
    contrast and colour are exact per-channel gains, and an occluding patch is one flat block."""
    grey = np.full((120, 120, 3), 128, dtype=np.uint8)
    rng = np.random.default_rng(3)
    only_noise = PhotometricConfig(brightness=0, contrast=0, colour=0, blur_probability=0,
                                   noise_probability=1, noise_sigma_max=20.0, occlusion_probability=0)
    noisy = [photometric(grey, rng, only_noise).astype(float) - 128 for _ in range(40)]
    sigmas = np.array([n.std() for n in noisy])
    assert sigmas.max() <= 20.5 and sigmas.max() > 15 and 8 < sigmas.mean() < 12  # sigma ~ U[0, 20]
    assert all(abs(n.mean()) < 0.5 for n in noisy if n.std() > 2)
    assert abs(np.corrcoef(noisy[0].ravel(), noisy[1].ravel())[0, 1]) < 0.1

    ramp = np.broadcast_to(np.arange(40, 220, 1.5)[:, None, None], (120, 120, 3)).astype(np.uint8)
    gains = PhotometricConfig(brightness=0, contrast=0.3, colour=0.1, blur_probability=0,
                              noise_probability=0, occlusion_probability=0)
    out = photometric(ramp, np.random.default_rng(8), gains).astype(float)
    for channel in range(3):  # an affine map of the grey levels, rounded: slope in the gain range
        slope, _ = np.polyfit(ramp[:, 0, channel], out[:, 0, channel], 1)
        assert 0.7 * 0.9 - 0.01 < slope < 1.3 * 1.1 + 0.01
        fit = np.polyval(np.polyfit(ramp[:, 0, channel], out[:, 0, channel], 1), ramp[:, 0, channel])
        assert np.abs(fit - out[:, 0, channel]).max() <= 1.0

    patch = PhotometricConfig(brightness=0, contrast=0, colour=0, blur_probability=0, noise_probability=0,
                              occlusion_probability=1, occlusion_max_fraction=0.35)
    out = photometric(grey, np.random.default_rng(1), patch)
    changed = np.argwhere(np.any(out != 128, axis=2))
    (top, left), (bottom, right) = changed.min(axis=0), changed.max(axis=0) + 1
    assert 12 <= bottom - top <= 42 and 12 <= right - left <= 42
    assert len(np.unique(out[top:bottom, left:right].reshape(-1, 3), axis=0)) == 1


@pytest.mark.parametrize("sigma", [0.3, 0.8, 1.5])
def test_blur_is_the_gaussian_of_its_sigma(sigma):
    """The blur is a Gaussian of the drawn sigma out to 3 sigma with reflected borders: within one
    grey level of a float64 convolution and of OpenCV's own GaussianBlur."""
    image = np.random.default_rng(4).integers(0, 256, (120, 120, 3), dtype=np.uint8)
    out = gaussian_blur(image, sigma)
    radius = (int(round(6 * sigma + 1)) | 1) // 2
    reference = scipy.ndimage.gaussian_filter(image.astype(np.float64), (sigma, sigma, 0), mode="mirror",
                                              radius=(radius, radius, 0))
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.abs(out - reference).max() <= 1.0
    assert np.abs(out.astype(int) - cv2.GaussianBlur(image, (0, 0), sigma)).max() <= 1
    # On white noise a 2-D kernel k x k scales the deviation by sum(k**2): the strength of this sigma.
    kernel = cv2.getGaussianKernel(2 * radius + 1, sigma)[:, 0]
    assert out.std() / image.std() == pytest.approx((kernel**2).sum(), rel=0.05)


def test_same_generator_same_crops_and_flip_needs_a_mirror(faces):
    image, annotation, truth = faces[2]
    box = landmark_crop_box(truth)
    config = AugmentConfig(copies=3, geometric=GeometricConfig(flip_probability=0))
    first = augment(image, annotation, box, config, np.random.default_rng(9), None)
    second = augment(image, annotation, box, config, np.random.default_rng(9), None)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
    with pytest.raises(ValueError, match="flip_probability > 0 needs the morphable model's mirror map"):
        augment(image, annotation, box, AugmentConfig(), np.random.default_rng(0), None)


def test_a_batch_gives_each_face_the_crops_it_gets_alone(faces, synthetic_head):
    """The preprocessing plans a whole batch's geometry at once; each face must still get exactly
    the crops (pixels, labels, flips) that its own generator gives it on its own."""
    config = AugmentConfig()  # the default: four crops, flips and every photometric change
    mirror = mirror_map(synthetic_head.model)
    images = [image for image, _, _ in faces]
    boxes = landmark_crop_box(np.stack([truth for _, _, truth in faces]))
    poses, params = annotation_arrays([annotation for _, annotation, _ in faces])
    base = labels_from_poses(poses, params, boxes, np.array([image.shape[0] for image in images]))
    rngs = [np.random.default_rng([0, k]) for k in range(len(faces))]
    plan = plan_crops(base, boxes, config, rngs, mirror)
    assert plan.flips.any() and not plan.flips.all()
    for k, (image, annotation, _) in enumerate(faces):
        batched = render_crops(image, plan, k, config.photometric, rngs[k])
        alone = augment(image, annotation, boxes[k], config, np.random.default_rng([0, k]), mirror)
        for a, b in zip(batched, alone, strict=True):
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_allclose(a.label, b.label, rtol=0, atol=1e-9)
            assert a.flipped == b.flipped


def test_config_ranges_are_checked():
    with pytest.raises(ValueError, match=r"scale_jitter must be a finite number in \[0, 1\), got 1.5"):
        GeometricConfig(scale_jitter=1.5)
    with pytest.raises(ValueError, match=r"blur_probability must be a finite number in \[0, 1\], got 2.0"):
        PhotometricConfig(blur_probability=2.0)
    with pytest.raises(ValueError, match="copies must be >= 1, got 0"):
        AugmentConfig(copies=0)
