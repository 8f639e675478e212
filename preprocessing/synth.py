"""Synthetic 300W-LP and AFLW2000-3D folders, rendered from a morphable model.

The embedded default of the project: the real datasets need registration, so a fresh clone
renders its own faces, in the real datasets' exact file layout and .mat conventions, and the
real readers read them unchanged. Every figure measured on these folders is a synthetic figure.

What differs from the real datasets, by design:
- faces are rendered from :func:`models.synthetic_face.build_synthetic_head` (or any morphable
  model with triangles), so the .mat parameters describe the image exactly, with no fitting error;
- ``pt2d`` (and ``landmarks/*_pts.mat``) hold the projected 3D landmarks: there is no separate
  hand-placed 2D contour;
- a ``_Flip`` image is the mirrored face (coefficients mirrored with :mod:`models.mirror`, exact
  for the synthetic head) rendered with the mirrored pose, light and background: the mirror image
  of its twin up to rasterisation, with an exact .mat;
- ``Illum_Para`` holds the light used (direction, ambient, diffuse, specular, shininess, colour),
  ``Color_Para`` the skin and hair colours; ``Tex_Para`` is zero (no texture model).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import multiprocessing
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

import cv2
import numpy as np
import pyarrow.fs as pafs
import scipy.io

from models.frame import crop_image, landmark_crop_box, reflect
from models.metrics import AFLW21_FROM_68
from models.mirror import mirror_map
from models.params import NUM_EXPRESSION, NUM_SHAPE, rotation_from_angles
from models.synthetic_face import SyntheticHead, build_synthetic_head
from preprocessing.config_rules import AT_LEAST_1, JPEG_QUALITY, SEED_RANGE, Range, check_fields
from preprocessing.datasets import SUBSETS_300W_LP, resolve
from preprocessing.render import Lighting, random_background, random_lighting, render_mesh
from preprocessing.shards import write_bytes_atomic

LOG = logging.getLogger(__name__)
Layout = Literal["300w-lp", "aflw2000-3d"]
LAYOUTS = typing.get_args(Layout)
IMAGE_SIZE = 450  # both real datasets
# A face wider than the image is not the datasets' framing.
FACE_WIDTH_PX = Annotated[float, Range(gt=0, le=IMAGE_SIZE)]
# Real files carry 199 identity and 29 expression coefficients; the label uses the first 40 / 10.
MAT_SHAPE_LENGTH = 199
MAT_EXPRESSION_LENGTH = 29
# AFLW2000-3D's |yaw| bins [0,30], (30,60], (60,90] hold 1312 / 383 / 305 of 2000 faces.
AFLW2000_YAW_BIN_SHARES = (1312 / 2000, 383 / 2000, 305 / 2000)


@dataclass(frozen=True)
class SynthConfig:
    """What to render. ``n`` counts images in the unflipped folders (300W-LP) or in all (AFLW2000-3D).

    Every number declares its range in its annotation (:mod:`preprocessing.config_rules`)."""

    layout: Layout
    n: Annotated[int, AT_LEAST_1]
    seed: Annotated[int, SEED_RANGE] = 0
    views_per_face: Annotated[int, AT_LEAST_1] = 4  # 300W-LP: profile views of each source face (~18 real)
    flip: bool = True  # 300W-LP: also write the _Flip folders
    jpeg_quality: Annotated[int, JPEG_QUALITY] = 92
    face_width_px: tuple[FACE_WIDTH_PX, FACE_WIDTH_PX] = (150.0, 230.0)  # drawn uniformly between the two
    centre_jitter_px: Annotated[float, Range(ge=0, le=IMAGE_SIZE / 2)] = 20.0  # keeps the centre inside
    max_pitch_deg: Annotated[float, Range(ge=0, le=90)] = 30.0  # pitch is an Euler angle in [-90, 90]
    max_roll_deg: Annotated[float, Range(ge=0, le=180)] = 25.0

    def __post_init__(self) -> None:
        check_fields(self)
        low, high = self.face_width_px
        if low > high:
            raise ValueError(f"face_width_px must be [low, high] with low <= high, got {[low, high]}")


@dataclass(frozen=True)
class FaceSpec:
    """One image to render: everything random about it, already drawn."""

    relative_stem: str  # e.g. "AFW/AFW_000003_1_2" or "image00017"
    pose_para: np.ndarray  # (7,) float32 values, as stored
    shape_para: np.ndarray  # (40,)
    exp_para: np.ndarray  # (10,)
    background_seed: int
    lighting: Lighting
    skin_bgr: np.ndarray  # (3,)
    hair_bgr: np.ndarray  # (3,)
    mirror_background: bool = False
    write_landmark_file: bool = False


def _sample_identity(head: SyntheticHead, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    shape = rng.normal(0.0, 1.0, NUM_SHAPE) * head.shape_std
    # Most faces show a mild expression, some a strong one; negative jaw opening would push the
    # lips through each other, so that one is one-sided.
    strength = rng.choice([0.3, 1.0], p=[0.6, 0.4])
    expression = rng.normal(0.0, 1.0, NUM_EXPRESSION) * head.expression_std * strength
    expression[head.expression_names.index("jaw_open")] = abs(
        expression[head.expression_names.index("jaw_open")]
    )
    return shape, expression


# Skin tones from very light to dark and hair colours (BGR in [0, 1]); a face's skin is drawn
# between two neighbouring tones.
SKIN_TONES_BGR = np.array([[0.65, 0.76, 0.95], [0.45, 0.64, 0.87], [0.30, 0.52, 0.77],
                           [0.17, 0.35, 0.56], [0.13, 0.21, 0.34]])
HAIR_COLOURS_BGR = np.array([[0.05, 0.05, 0.06], [0.07, 0.12, 0.19], [0.12, 0.22, 0.35],
                             [0.35, 0.55, 0.70], [0.42, 0.47, 0.52]])


def _sample_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    position = rng.uniform(0.0, len(SKIN_TONES_BGR) - 1.0)
    low = int(position)
    high = min(low + 1, len(SKIN_TONES_BGR) - 1)
    skin = SKIN_TONES_BGR[low] + (position - low) * (SKIN_TONES_BGR[high] - SKIN_TONES_BGR[low])
    hair = HAIR_COLOURS_BGR[rng.choice(len(HAIR_COLOURS_BGR), p=[0.35, 0.3, 0.15, 0.1, 0.1])]
    return (np.clip(skin + rng.normal(0, 0.015, 3), 0.02, 1.0),
            np.clip(hair + rng.normal(0, 0.015, 3), 0.02, 1.0))


def _pose(rng: np.random.Generator, config: SynthConfig, yaw: float, head: SyntheticHead) -> np.ndarray:
    pitch = np.deg2rad(np.clip(rng.normal(0.0, 10.0), -config.max_pitch_deg, config.max_pitch_deg))
    roll = np.deg2rad(np.clip(rng.normal(0.0, 8.0), -config.max_roll_deg, config.max_roll_deg))
    width_units = np.ptp(head.model.mean[0, head.model.landmark_indices])
    scale = rng.uniform(*config.face_width_px) / width_units
    tx, ty = IMAGE_SIZE / 2 + rng.uniform(-config.centre_jitter_px, config.centre_jitter_px, 2)
    # tz only shifts depth; the real files hold values of this order.
    tz = -scale * float(np.mean(head.model.mean[2]))
    # Stored as float32, like the real files: render and landmarks use the stored values.
    return np.array([pitch, np.deg2rad(yaw), roll, tx, ty, tz, scale], dtype=np.float32)


def mirrored_pose(pose_para: np.ndarray) -> np.ndarray:
    """The pose of the horizontally mirrored image: yaw and roll negated, tx mirrored."""
    mirrored = np.array(pose_para, dtype=np.float32, copy=True)
    mirrored[1] = -mirrored[1]
    mirrored[2] = -mirrored[2]
    mirrored[3] = reflect(mirrored[3], IMAGE_SIZE)
    return mirrored


def _face_specs_300w_lp(config: SynthConfig, head: SyntheticHead) -> Iterator[FaceSpec]:
    faces = math.ceil(config.n / config.views_per_face)
    mirror = mirror_map(head.model) if config.flip else None
    written = 0
    for face in range(faces):
        rng = np.random.default_rng([config.seed, face])
        subset = SUBSETS_300W_LP[face % len(SUBSETS_300W_LP)]
        shape, expression = _sample_identity(head, rng)
        skin, hair = _sample_colours(rng)
        lighting = random_lighting(rng)
        background_seed = int(rng.integers(2**31))
        # Like 300W-LP's profiling: the source view, then views turned further towards profile.
        start = rng.uniform(-30.0, 30.0)
        end = math.copysign(rng.uniform(75.0, 90.0), start if start else 1.0)
        yaws = np.linspace(start, end, config.views_per_face) if config.views_per_face > 1 else [start]
        for view, yaw in enumerate(yaws):
            if written == config.n:
                return
            written += 1
            stem = f"{subset}_{face:06d}_1_{view}"
            spec = FaceSpec(
                relative_stem=f"{subset}/{stem}", pose_para=_pose(rng, config, float(yaw), head),
                shape_para=shape, exp_para=expression, background_seed=background_seed,
                lighting=lighting, skin_bgr=skin, hair_bgr=hair, write_landmark_file=True,
            )
            yield spec
            if mirror is not None:
                light = replace(lighting, direction=lighting.direction * np.array([-1.0, 1.0, 1.0]))
                alphas = mirror.matrix @ np.concatenate([shape, expression]) + mirror.offset
                yield replace(
                    spec, relative_stem=f"{subset}_Flip/{stem}", pose_para=mirrored_pose(spec.pose_para),
                    shape_para=alphas[:NUM_SHAPE], exp_para=alphas[NUM_SHAPE:], lighting=light,
                    mirror_background=True, write_landmark_file=False,
                )


def _face_specs_aflw2000(config: SynthConfig, head: SyntheticHead) -> Iterator[FaceSpec]:
    for index in range(config.n):
        rng = np.random.default_rng([config.seed, index])
        low, high = [(0.0, 30.0), (30.0, 60.0), (60.0, 90.0)][
            rng.choice(3, p=AFLW2000_YAW_BIN_SHARES)
        ]
        yaw = rng.uniform(low, high) * rng.choice([-1.0, 1.0])
        shape, expression = _sample_identity(head, rng)
        skin, hair = _sample_colours(rng)
        yield FaceSpec(
            relative_stem=f"image{index:05d}", pose_para=_pose(rng, config, yaw, head),
            shape_para=shape, exp_para=expression, background_seed=int(rng.integers(2**31)),
            lighting=random_lighting(rng), skin_bgr=skin, hair_bgr=hair,
        )


def face_specs(config: SynthConfig, head: SyntheticHead) -> list[FaceSpec]:
    """Every image of a synthetic dataset, deterministic for ``config.seed``."""
    if config.layout == "300w-lp":
        return list(_face_specs_300w_lp(config, head))
    return list(_face_specs_aflw2000(config, head))


def image_space_vertices(head: SyntheticHead, spec: FaceSpec) -> np.ndarray:
    """All vertices of the face in image coordinates (3, N): the .mat convention, row y down."""
    pose = spec.pose_para.astype(np.float64)
    params = np.zeros(62)
    params[12:52] = spec.shape_para
    params[52:] = spec.exp_para
    points = pose[6] * rotation_from_angles(*pose[:3]) @ head.model.shapes(params) + pose[3:6, None]
    points[1] = reflect(points[1], IMAGE_SIZE)
    return points


def render_face(head: SyntheticHead, spec: FaceSpec) -> tuple[np.ndarray, np.ndarray]:
    """The rendered image (450, 450, 3) uint8 and the face's image-space vertices (3, N)."""
    background = random_background(np.random.default_rng(spec.background_seed), IMAGE_SIZE, IMAGE_SIZE)
    if spec.mirror_background:
        background = np.ascontiguousarray(background[:, ::-1])
    vertices = image_space_vertices(head, spec)
    colours = head.colours(spec.skin_bgr, spec.hair_bgr)
    image, _ = render_mesh(vertices, head.model.triangles, colours, background, spec.lighting)
    return image, vertices


def example_crop(seed: int = 0) -> np.ndarray:
    """One synthetic AFLW2000-3D-style face cropped by the landmark rule: (120, 120, 3) BGR uint8,
    a realistic input example for a logged model."""
    head = build_synthetic_head()
    spec = face_specs(SynthConfig("aflw2000-3d", n=1, seed=seed), head)[0]
    image, vertices = render_face(head, spec)
    return crop_image(image, landmark_crop_box(vertices[:2, head.model.landmark_indices]))


def _mat_fields(head: SyntheticHead, spec: FaceSpec, vertices: np.ndarray, layout: str) -> dict:
    landmarks = vertices[:, head.model.landmark_indices]  # (3, 68)
    shape = np.zeros((MAT_SHAPE_LENGTH, 1))
    shape[:NUM_SHAPE, 0] = spec.shape_para
    expression = np.zeros((MAT_EXPRESSION_LENGTH, 1))
    expression[:NUM_EXPRESSION, 0] = spec.exp_para
    light = spec.lighting
    fields = {
        "Pose_Para": spec.pose_para.reshape(1, 7).astype(np.float32),
        "Shape_Para": shape,
        "Exp_Para": expression,
        "Tex_Para": np.zeros((MAT_SHAPE_LENGTH, 1)),
        "Illum_Para": np.concatenate([
            light.direction, [light.ambient, light.diffuse, light.specular, light.shininess],
            light.colour,
        ])[:10].reshape(1, 10),
        "Color_Para": np.concatenate([spec.skin_bgr, spec.hair_bgr, [0.0]]).reshape(1, 7).astype(np.float32),
        "roi": np.round(landmark_crop_box(landmarks)).astype(np.int16).reshape(1, 4),
    }
    if layout == "aflw2000-3d":
        fields["pt3d_68"] = landmarks.astype(np.float32)
        fields["pt2d"] = _aflw21_points(head, spec, vertices)
    else:
        fields["pt2d"] = landmarks[:2].copy()
    return fields


def _aflw21_points(head: SyntheticHead, spec: FaceSpec, vertices: np.ndarray) -> np.ndarray:
    """AFLW's 21 points, -1 where the landmark faces away from the camera (as AFLW marks them)."""
    landmarks = vertices[:, head.model.landmark_indices]
    facing = head.landmark_facing_camera(vertices)
    points = np.full((2, 21), -1.0)
    for k, members in enumerate(AFLW21_FROM_68):
        ids = [m - 1 for m in members]
        if facing[ids].all():
            points[:, k] = landmarks[:2, ids].mean(axis=1)
    return points


# A MAT 5 file opens with 116 bytes of descriptive text; scipy writes the current time there.
# A fixed text keeps a dataset byte-identical for a seed.
_MAT_HEADER_TEXT = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: mobile-frnet synth"
_MAT_HEADER_LENGTH = 116


def _encode_mat(fields: dict) -> bytes:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, fields, do_compression=False)
    data = buffer.getvalue()
    return _MAT_HEADER_TEXT.ljust(_MAT_HEADER_LENGTH, b" ") + data[_MAT_HEADER_LENGTH:]


def write_sample(head: SyntheticHead, spec: FaceSpec, out: str, config: SynthConfig) -> None:
    """Render one face and write its .jpg and .mat (and 300W-LP landmark file) under ``out`` (a
    folder or a filesystem URI such as ``s3://bucket/prefix``), each file whole or not at all."""
    image, vertices = render_face(head, spec)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {spec.relative_stem}")
    filesystem, base = _output(out)
    stem_path = f"{base}/{spec.relative_stem}"
    fields = _mat_fields(head, spec, vertices, config.layout)
    # The .mat last: a folder interrupted mid-write never holds a .mat without its image.
    write_bytes_atomic(filesystem, f"{stem_path}.jpg", encoded.tobytes())
    write_bytes_atomic(filesystem, f"{stem_path}.mat", _encode_mat(fields))
    if spec.write_landmark_file:
        subset, stem = spec.relative_stem.split("/")
        points = fields["pt2d"].T
        write_bytes_atomic(filesystem, f"{base}/landmarks/{subset}/{stem}_pts.mat",
                           _encode_mat({"pts_2d": points, "pts_3d": points}))


@functools.cache
def _output(out: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and base path of an output location, opened once per process."""
    return resolve(out)


_WORKER_HEAD: SyntheticHead | None = None


def _init_worker() -> None:
    global _WORKER_HEAD  # one model per worker process, built once
    # One thread per worker process: the processes are the parallelism.
    cv2.setNumThreads(1)
    _WORKER_HEAD = build_synthetic_head()


def _write_one(args: tuple[FaceSpec, str, SynthConfig]) -> str:
    spec, out_dir, config = args
    assert _WORKER_HEAD is not None
    write_sample(_WORKER_HEAD, spec, out_dir, config)
    return spec.relative_stem


def generate(
    config: SynthConfig, out_dir: str | Path, workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write a synthetic dataset into ``out_dir`` (a folder, or a filesystem URI such as
    ``s3://bucket/prefix``); returns its figures (counts, images/s).

    Files are written under deterministic names, each atomically, so a re-run with the same
    config overwrites rather than duplicates.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    filesystem, base = _output(str(out_dir))
    out_dir = str(out_dir)
    filesystem.create_dir(base, recursive=True)
    head = build_synthetic_head()
    specs = face_specs(config, head)
    started = time.perf_counter()
    jobs = [(spec, out_dir, config) for spec in specs]
    if workers == 1:
        for done, spec in enumerate(specs, start=1):
            write_sample(head, spec, out_dir, config)
            if progress:
                progress(done, len(specs))
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_worker) as pool:
            for done, _ in enumerate(pool.imap_unordered(_write_one, jobs, chunksize=4), start=1):
                if progress:
                    progress(done, len(specs))
    seconds = time.perf_counter() - started
    figures = {
        "layout": config.layout,
        "images": len(specs),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(specs) / seconds, 2),
        "workers": workers,
        "images_per_second_per_worker": round(len(specs) / seconds / workers, 2),
        "morphable_model": head.model.identity,
        "config": asdict(config),
        "synthetic": True,
    }
    write_bytes_atomic(filesystem, f"{base}/synth.json", (json.dumps(figures, indent=2) + "\n").encode())
    return figures
