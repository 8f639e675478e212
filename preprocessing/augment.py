"""Augmentation of one source face into labelled 120x120 crops.

Geometric changes (crop scale and shift jitter, in-plane rotation, horizontal flip) move the
image and update the 62-d label with it (P only, plus the mirrored shape part for a flip; see
:func:`preprocessing.labels.transform_label` and :mod:`models.mirror`). Photometric changes
(brightness, contrast, colour, blur, noise, occluding patches) touch pixels only. Every function
here is pure: randomness comes from the generator passed in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Annotated

import cv2
import numpy as np

from models.frame import (
    CROP_SIZE,
    apply_transform,
    box_transform,
    compose_transforms,
    mirror_transform,
    warp_image,
)
from models.mirror import MirrorMap, mirror_params
from models.morphable import IBUG_MIRROR_IDS
from models.params import NUM_PARAMS
from preprocessing.annotations import MatAnnotation
from preprocessing.config_rules import AT_LEAST_1, FRACTION, PROBABILITY, Range, check_fields
from preprocessing.labels import label_from_annotation, transform_label

IDENTITY_TRANSFORM = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@dataclass(frozen=True)
class GeometricConfig:
    """Ranges of the geometric augmentations (each drawn uniformly)."""

    scale_jitter: Annotated[float, FRACTION] = 0.10  # crop side times U[1 - j, 1 + j]
    shift_jitter: Annotated[float, FRACTION] = 0.08  # crop centre moved by U[-j, j] of the side, per axis
    rotation_deg: Annotated[float, Range(ge=0, le=180)] = 15.0  # in-plane rotation in U[-r, r] degrees
    flip_probability: Annotated[float, PROBABILITY] = 0.5

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class PhotometricConfig:
    """Strengths and probabilities of the photometric augmentations."""

    brightness: Annotated[float, FRACTION] = 0.2  # additive shift in U[-b, b] * 255
    contrast: Annotated[float, FRACTION] = 0.3  # gain about the mean in U[1 - c, 1 + c]
    colour: Annotated[float, FRACTION] = 0.1  # per-channel gain in U[1 - c, 1 + c]
    blur_probability: Annotated[float, PROBABILITY] = 0.2
    # Pixels; a sigma past the crop's side blurs it to its mean (and the kernel grows with it).
    blur_sigma_max: Annotated[float, Range(ge=0, le=CROP_SIZE)] = 1.5
    noise_probability: Annotated[float, PROBABILITY] = 0.3
    noise_sigma_max: Annotated[float, Range(ge=0, le=255)] = 8.0  # grey levels
    occlusion_probability: Annotated[float, PROBABILITY] = 0.3
    occlusion_max_fraction: Annotated[float, FRACTION] = 0.35  # side of the patch, as a fraction of the crop

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class AugmentConfig:
    """How many crops each source face gives, and which augmentations they get. Every number of
    these configs declares its range in its annotation (:mod:`preprocessing.config_rules`)."""

    copies: Annotated[int, AT_LEAST_1] = 4  # crops per source image
    keep_original: bool = True  # crop 0 is the plain landmark-rule crop
    geometric: GeometricConfig = field(default_factory=GeometricConfig)
    photometric: PhotometricConfig = field(default_factory=PhotometricConfig)

    def __post_init__(self) -> None:
        check_fields(self)


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


def jitter_transforms(u: np.ndarray, config: GeometricConfig, size: int = CROP_SIZE) -> np.ndarray:
    """Random crop -> crop similarities (..., 2, 3) about the crop centre (scale, rotation, then
    shift) from uniform draws ``u`` (..., 4) in [0, 1)."""
    scale = 1.0 / (1.0 - config.scale_jitter + 2.0 * config.scale_jitter * u[..., 0])
    angle = np.radians(config.rotation_deg * (2.0 * u[..., 1] - 1.0))
    shift = config.shift_jitter * (2.0 * u[..., 2:4] - 1.0) * size
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    linear = np.stack([np.stack([cos, -sin], axis=-1), np.stack([sin, cos], axis=-1)], axis=-2)
    centre = np.array([size / 2.0, size / 2.0])
    offset = centre - linear @ centre - shift
    return np.concatenate([linear, offset[..., None]], axis=-1)


# White noise is drawn once per process (fixed seed) and each noisy crop takes a window of it
# at a random offset, a far cheaper draw than 43,200 normal deviates per crop. Windows of one
# 512x512 field still give every crop its own noise pattern.
NOISE_FIELD_SIDE = 512


@functools.cache
def _noise_field() -> np.ndarray:
    return np.random.default_rng(0x5EED).standard_normal((NOISE_FIELD_SIDE, NOISE_FIELD_SIDE, 3),
                                                        dtype=np.float32)


def _noise(shape: tuple[int, ...], u_top: float, u_left: float, rng: np.random.Generator) -> np.ndarray:
    """Unit white noise of ``shape`` (H, W, 3): a window of the shared field where it fits."""
    height, width = shape[:2]
    field = _noise_field()
    if height > field.shape[0] or width > field.shape[1] or shape[2:] != (3,):
        return rng.standard_normal(shape, dtype=np.float32)
    top = int(u_top * (field.shape[0] - height + 1))
    left = int(u_left * (field.shape[1] - width + 1))
    return field[top:top + height, left:left + width]


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a uint8 image (H, W, C), the kernel out to 3 sigma each side (OpenCV's own
    choice for 8-bit images), borders reflected: two 1-D passes of the float kernel, within one
    grey level of cv2.GaussianBlur's slower bit-exact 8-bit path."""
    taps = int(round(6.0 * sigma + 1.0)) | 1
    kernel = cv2.getGaussianKernel(taps, sigma)
    return cv2.sepFilter2D(image, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)


# The 256 grey levels in each of three channels (1, 256, 3): what a crop's lookup table maps.
_GREY_LEVELS = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
_DIAGONAL = (np.arange(3), np.arange(3))


def photometric(image: np.ndarray, rng: np.random.Generator, config: PhotometricConfig) -> np.ndarray:
    """Brightness, contrast, colour, then blur, noise and an occluding patch, each by chance.

    ``image`` is (H, W, 3) uint8. Contrast (about the image mean), colour gain and brightness
    are one per-channel map of the 256 grey levels, applied as a lookup table; the generator
    gives the same number of draws whatever is chosen, so one crop's choices never shift the next.
    Each call runs for every augmented crop, so it keeps to whole-image OpenCV calls: numpy's
    mean over the crop alone cost half as much as the lookup table.
    """
    u = rng.random(19).tolist()  # python floats: cheaper than numpy scalars for this arithmetic
    gain = 1.0 - config.contrast + 2.0 * config.contrast * u[0]
    colour = [1.0 - config.colour + 2.0 * config.colour * x for x in u[1:4]]
    shift = (2.0 * u[4] - 1.0) * config.brightness * 255.0
    mean = sum(cv2.sumElems(image)) / image.size  # the contrast pivot
    # ((level - mean) * gain + mean) * colour + shift, one affine map a level + b per channel,
    # rounded and saturated to uint8 by cv2.transform: the (1, 256, 3) table of the lookup.
    affine = np.zeros((3, 4))
    affine[_DIAGONAL] = [gain * c for c in colour]
    affine[:, 3] = [mean * (1.0 - gain) * c + shift for c in colour]
    out = cv2.LUT(image, cv2.transform(_GREY_LEVELS, affine))
    if u[5] < config.blur_probability and config.blur_sigma_max > 0:
        sigma = 0.3 + (config.blur_sigma_max - 0.3) * u[6]
        out = gaussian_blur(out, sigma)
    if u[7] < config.noise_probability and config.noise_sigma_max > 0:
        sigma = u[8] * config.noise_sigma_max
        out = cv2.addWeighted(out, 1.0, _noise(out.shape, u[9], u[10], rng), sigma, 0.0, dtype=cv2.CV_8U)
    if u[11] < config.occlusion_probability:
        height, width = out.shape[:2]
        low, high = 0.1, config.occlusion_max_fraction
        side_h = int((low + (high - low) * u[12]) * height)
        side_w = int((low + (high - low) * u[13]) * width)
        top = int(u[14] * (height - side_h + 1))
        left = int(u[15] * (width - side_w + 1))
        out[top:top + side_h, left:left + side_w] = [int(x * 255.0) for x in u[16:19]]
    return out


@dataclass(frozen=True)
class CropPlan:
    """The geometry of a batch of sources' crops, before any pixel is touched.

    Attributes:
        labels: (B, copies, 62) float64, each crop's label in its own frame.
        transforms: (B, copies, 2, 3) image -> crop affines (1-based), before any flip.
        flips: (B, copies) bool, which crops are mirrored.
        plain: (copies,) bool, which crop indices get no augmentation at all.
    """

    labels: np.ndarray
    transforms: np.ndarray
    flips: np.ndarray
    plain: np.ndarray


def plan_crops(
    base_labels: np.ndarray,
    boxes: np.ndarray,
    config: AugmentConfig,
    rngs: list[np.random.Generator],
    mirror: MirrorMap | None,
    size: int = CROP_SIZE,
) -> CropPlan:
    """The crops of B sources at once: base labels (B, 62) in the frames of their landmark-rule
    boxes (B, 4), one generator per source (its jitter draws, then its flip draws).

    One batch of numpy calls for all sources: per source, these small-matrix steps cost about as
    much as warping its crops. A flip needs ``mirror`` (the morphable model's
    :class:`~models.mirror.MirrorMap`); with none, a non-zero flip probability is an error rather
    than a silently unflipped dataset.
    """
    if config.geometric.flip_probability > 0 and mirror is None:
        raise ValueError("flip_probability > 0 needs the morphable model's mirror map")
    sources, count = len(rngs), config.copies
    plain = np.zeros(count, dtype=bool)
    plain[0] = config.keep_original
    moved = int((~plain).sum())
    draws = [(rng.random((moved, 4)), rng.random(count)) for rng in rngs]
    jitters = np.broadcast_to(IDENTITY_TRANSFORM, (sources, count, 2, 3)).copy()
    labels = np.broadcast_to(base_labels[:, None], (sources, count, NUM_PARAMS)).copy()
    if moved:
        jitters[:, ~plain] = jitter_transforms(np.array([u for u, _ in draws]).reshape(sources, moved, 4),
                                               config.geometric, size)
        labels[:, ~plain] = transform_label(labels[:, ~plain], jitters[:, ~plain], size)
    flip_draws = np.array([u for _, u in draws]).reshape(sources, count)
    flips = ~plain & (flip_draws < config.geometric.flip_probability)
    transforms = compose_transforms(jitters, box_transform(boxes, size)[:, None])
    if flips.any():
        labels[flips] = mirror_params(labels[flips], mirror, size)
    return CropPlan(labels=labels, transforms=transforms, flips=flips, plain=plain)


def render_crops(
    image: np.ndarray, plan: CropPlan, source: int, config: PhotometricConfig, rng: np.random.Generator,
    size: int = CROP_SIZE,
) -> list[AugmentedCrop]:
    """The pixels of one source's planned crops (``source`` indexes the plan): warp, flip, then
    the photometric changes, drawn from the source's generator after its geometric draws."""
    crops = []
    for index, plain in enumerate(plan.plain):
        crop = warp_image(image, plan.transforms[source, index], size)
        flipped = bool(plan.flips[source, index])
        if flipped:
            crop = cv2.flip(crop, 1)
        if not plain:
            crop = photometric(crop, rng, config)
        crops.append(AugmentedCrop(index, crop, plan.labels[source, index], plan.transforms[source, index],
                                   flipped))
    return crops


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
    The same crops as :func:`plan_crops` and :func:`render_crops` give it in a batch."""
    base_label = label_from_annotation(annotation, box, image.shape[0], size)
    plan = plan_crops(base_label[None], np.asarray(box, dtype=np.float64)[None], config, [rng], mirror, size)
    return render_crops(image, plan, 0, config.photometric, rng, size)


def expected_crop_landmarks(
    image_landmarks: np.ndarray, crop: AugmentedCrop, size: int = CROP_SIZE
) -> np.ndarray:
    """Where image landmarks (3, 68) land in an augmented crop, renumbered after a flip."""
    points = apply_transform(crop.transform, image_landmarks)
    if crop.flipped:
        points = apply_transform(mirror_transform(size), points)[:, IBUG_MIRROR_IDS]
    return points
