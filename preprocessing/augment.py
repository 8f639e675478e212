"""Augmentation of one source face into labelled 120x120 crops.

Geometric changes (crop scale and shift jitter, in-plane rotation, horizontal flip) move the
image and update the 62-d label with it (P only, plus the mirrored shape part for a flip; see
:func:`preprocessing.labels.transform_label` and :mod:`models.mirror`). Photometric changes
(brightness, contrast, colour, blur, noise, occluding patches) touch pixels only. Every function
here is pure: randomness comes from the generator passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from models.mirror import MirrorMap, mirror_params
from models.morphable import IBUG_MIRROR_IDS
from preprocessing.annotations import MatAnnotation
from preprocessing.geometry import (
    CROP_SIZE,
    apply_transform,
    box_transform,
    compose_transforms,
    warp_image,
)
from preprocessing.labels import label_from_annotation, transform_label

IDENTITY_TRANSFORM = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@dataclass(frozen=True)
class GeometricConfig:
    """Ranges of the geometric augmentations (each drawn uniformly)."""

    scale_jitter: float = 0.10  # crop side times U[1 - j, 1 + j]
    shift_jitter: float = 0.08  # crop centre moved by U[-j, j] of the side, per axis
    rotation_deg: float = 15.0  # in-plane rotation in U[-r, r] degrees
    flip_probability: float = 0.5

    def __post_init__(self) -> None:
        for name in ("scale_jitter", "shift_jitter", "flip_probability"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0 and not (name == "flip_probability" and value == 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not 0.0 <= self.rotation_deg <= 180.0:
            raise ValueError(f"rotation_deg must be in [0, 180], got {self.rotation_deg}")


@dataclass(frozen=True)
class PhotometricConfig:
    """Strengths and probabilities of the photometric augmentations."""

    brightness: float = 0.2  # additive shift in U[-b, b] * 255
    contrast: float = 0.3  # gain about the mean in U[1 - c, 1 + c]
    colour: float = 0.1  # per-channel gain in U[1 - c, 1 + c]
    blur_probability: float = 0.2
    blur_sigma_max: float = 1.5  # pixels
    noise_probability: float = 0.3
    noise_sigma_max: float = 8.0  # grey levels
    occlusion_probability: float = 0.3
    occlusion_max_fraction: float = 0.35  # side of the patch, as a fraction of the crop

    def __post_init__(self) -> None:
        for name in ("blur_probability", "noise_probability", "occlusion_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "colour", "occlusion_max_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.blur_sigma_max < 0 or self.noise_sigma_max < 0:
            raise ValueError("blur_sigma_max and noise_sigma_max must be >= 0")


@dataclass(frozen=True)
class AugmentConfig:
    """How many crops each source face gives, and which augmentations they get."""

    copies: int = 4  # crops per source image
    keep_original: bool = True  # crop 0 is the plain landmark-rule crop
    geometric: GeometricConfig = field(default_factory=GeometricConfig)
    photometric: PhotometricConfig = field(default_factory=PhotometricConfig)

    def __post_init__(self) -> None:
        if self.copies < 1:
            raise ValueError(f"copies must be >= 1, got {self.copies}")


@dataclass(frozen=True)
class AugmentedCrop:
    """One labelled crop.

    Attributes:
        index: the augmentation index within its source (0 = the plain crop when kept).
        image: (120, 120, 3) uint8 BGR.
        label: (62,) float64 in the crop's frame.
        transform: 2x3 image -> crop affine (1-based), before any flip.
        flipped: whether the crop was mirrored.
    """

    index: int
    image: np.ndarray
    label: np.ndarray
    transform: np.ndarray
    flipped: bool


def jitter_transform(
    rng: np.random.Generator, config: GeometricConfig, size: int = CROP_SIZE
) -> np.ndarray:
    """A random crop -> crop similarity about the crop centre: scale, rotation, then shift."""
    scale = 1.0 / rng.uniform(1.0 - config.scale_jitter, 1.0 + config.scale_jitter)
    angle = math.radians(rng.uniform(-config.rotation_deg, config.rotation_deg))
    shift = rng.uniform(-config.shift_jitter, config.shift_jitter, 2) * size
    centre = np.array([size / 2.0, size / 2.0])
    linear = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return np.concatenate([linear, (centre - linear @ centre - shift)[:, None]], axis=1)


def flip_crop_transform(size: int = CROP_SIZE) -> np.ndarray:
    """The horizontal mirror of a crop in 1-based coordinates: ``x -> size + 1 - x``."""
    return np.array([[-1.0, 0.0, size + 1.0], [0.0, 1.0, 0.0]])


def photometric(image: np.ndarray, rng: np.random.Generator, config: PhotometricConfig) -> np.ndarray:
    """Brightness, contrast, colour, then blur, noise and an occluding patch, each by chance."""
    out = image.astype(np.float32)
    gain = rng.uniform(1.0 - config.contrast, 1.0 + config.contrast)
    out = (out - out.mean()) * gain + out.mean()
    out = out * rng.uniform(1.0 - config.colour, 1.0 + config.colour, 3).astype(np.float32)
    out = out + np.float32(rng.uniform(-config.brightness, config.brightness) * 255.0)
    if rng.random() < config.blur_probability and config.blur_sigma_max > 0:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.3, config.blur_sigma_max))
    if rng.random() < config.noise_probability and config.noise_sigma_max > 0:
        sigma = rng.uniform(0.0, config.noise_sigma_max)
        out = out + rng.normal(0.0, sigma, out.shape).astype(np.float32)
    if rng.random() < config.occlusion_probability:
        height, width = out.shape[:2]
        side_h, side_w = (rng.uniform(0.1, config.occlusion_max_fraction, 2) * [height, width]).astype(int)
        top = rng.integers(0, height - side_h + 1)
        left = rng.integers(0, width - side_w + 1)
        out[top:top + side_h, left:left + side_w] = rng.uniform(0, 255, 3).astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def augment(
    image: np.ndarray,
    annotation: MatAnnotation,
    box: np.ndarray,
    config: AugmentConfig,
    rng: np.random.Generator,
    mirror: MirrorMap | None,
    size: int = CROP_SIZE,
) -> list[AugmentedCrop]:
    """``config.copies`` labelled crops of one face; ``box`` is its base (landmark-rule) crop box.

    A flip needs ``mirror`` (the morphable model's :class:`~models.mirror.MirrorMap`); with none,
    a non-zero flip probability is an error rather than a silently unflipped dataset.
    """
    if config.geometric.flip_probability > 0 and mirror is None:
        raise ValueError("flip_probability > 0 needs the morphable model's mirror map")
    base_transform = box_transform(box, size)
    base_label = label_from_annotation(annotation, box, image.shape[0], size)
    crops = []
    for index in range(config.copies):
        plain = index == 0 and config.keep_original
        jitter = IDENTITY_TRANSFORM if plain else jitter_transform(rng, config.geometric, size)
        transform = compose_transforms(jitter, base_transform)
        label = transform_label(base_label, jitter, size)
        crop = warp_image(image, transform, size)
        flipped = not plain and rng.random() < config.geometric.flip_probability
        if flipped:
            crop = np.ascontiguousarray(crop[:, ::-1])
            label = mirror_params(label, mirror, size)
        if not plain:
            crop = photometric(crop, rng, config.photometric)
        crops.append(AugmentedCrop(index, crop, label, transform, flipped))
    return crops


def expected_crop_landmarks(
    image_landmarks: np.ndarray, crop: AugmentedCrop, size: int = CROP_SIZE
) -> np.ndarray:
    """Where image landmarks (3, 68) land in an augmented crop, renumbered after a flip."""
    points = apply_transform(crop.transform, image_landmarks)
    if crop.flipped:
        points = apply_transform(flip_crop_transform(size), points)[:, IBUG_MIRROR_IDS]
    return points
