"""300W-LP -> augmented, labelled Parquet shards with Ray Data; AFLW2000-3D -> evaluation shards.

    list files -> read + decode -> 62-d label -> crop (landmark rule + jitter) -> augment
    -> encode -> Parquet

The sorted file list is cut into shards of ``sources_per_shard`` files. Ray Data runs one task
per shard (``map_batches`` over the shard list, one shard a batch); inside it the shard's files
stream through in batches of ``batch_size``, each batch appended as row groups to the shard's
train / val / quarantine files, which are renamed into place only when complete. A batch reads
its files and image headers and plans its crops together, but decodes its images one at a time,
each dropped once cropped: a task holds one decoded image (at most ``max_image_side`` squared
by 3 bytes), whatever the batch size. A shard whose
completion record exists (same config) is skipped, so a killed run resumes without duplicates.
Each task also returns the (count, mean, M2) moments of the labels it wrote to its training
shard (as stored, float32); the driver merges them into the whitening statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import cv2
import numpy as np
import pyarrow.fs as pafs
import ray

from models.frame import box_transform, crop_image, landmark_crop_box, reflect
from models.mirror import mirror_map
from models.morphable import MorphableModel
from models.params import NUM_PARAMS, ParamStats, pose_angles
from preprocessing.annotations import MAX_IMAGE_SIDE_PX, MatAnnotation
from preprocessing.augment import AugmentConfig, AugmentedCrop, plan_crops, render_crops
from preprocessing.config_rules import AT_LEAST_1, FRACTION, JPEG_QUALITY, POSITIVE, SEED_RANGE, check_fields
from preprocessing.datasets import EncodedImage, SampleRef, read_annotation, read_encoded_image, resolve
from preprocessing.errors import DatasetError, InvalidValueError
from preprocessing.labels import (
    annotation_arrays,
    canonical_angles,
    crop_landmarks,
    label_from_annotation,
    labels_from_poses,
    posed_landmarks,
)
from preprocessing.manifest import SPLITS
from preprocessing.shards import (
    QUARANTINE_SCHEMA,
    AtomicParquetWriter,
    encode_image,
    evaluation_schema,
    training_schema,
    write_bytes_atomic,
)

LOG = logging.getLogger(__name__)
# Landmark spread below this (crop pixels) is no face: a degenerate annotation.
MIN_LANDMARK_EXTENT_PX = 2.0
# How far landmarks may lie outside their image, as a fraction of the face's size (the larger side
# of their bounding box). AFLW2000-3D's own ground truth has faces cut by the frame: image02156's
# landmarks reach 108 px (18.5% of its 582 px face) past its 450 px image, 21% with the synthetic
# head's landmarks; an image at half the size its .mat was made for leaves about half the face
# outside. (The .mat's ``roi`` is not checked: real files' boxes run past the image, e.g.
# [53, -166, 638, 419] for the 450x450 300W-LP sample.)
LANDMARKS_OUTSIDE_MAX = 0.3


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that decides the shards' content (its hash names a run in the manifest)."""

    morphable_model: str = "synthetic"  # see models.face_models
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    image_format: Literal["jpeg", "png", "raw"] = "jpeg"
    jpeg_quality: Annotated[int, JPEG_QUALITY] = 95
    val_fraction: Annotated[float, FRACTION] = 0.1  # of subjects; 1 would leave nothing to train on
    seed: Annotated[int, SEED_RANGE] = 0
    # Deal the source files to the shards in a seeded random order (300W-LP lists a face's views
    # one after another, subset by subset; shards of consecutive files would each hold a few faces).
    shuffle_sources: bool = True
    # Source images a shard file and a Ray task hold (BENCHMARKS.md).
    sources_per_shard: Annotated[int, AT_LEAST_1] = 256
    # Source images whose crops are planned together inside a shard task.
    batch_size: Annotated[int, AT_LEAST_1] = 16
    num_cpus_per_task: Annotated[float, POSITIVE] = 1.0
    # Largest image side decoded; a header claiming more is quarantined unread (docs/shards.md).
    max_image_side: Annotated[int, AT_LEAST_1] = MAX_IMAGE_SIDE_PX

    def __post_init__(self) -> None:
        check_fields(self)

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def split_of(subject_id: str, val_fraction: float) -> str:
    """Deterministic split by subject: a hash of the id, so it never depends on file order."""
    value = int.from_bytes(hashlib.sha256(subject_id.encode()).digest()[:8], "big") / 2**64
    return "val" if value < val_fraction else "train"


def _check_face(annotation: MatAnnotation, landmarks: np.ndarray) -> None:
    extent = np.ptp(landmarks[:2], axis=1)
    if not np.all(np.isfinite(landmarks)) or extent.min() < MIN_LANDMARK_EXTENT_PX:
        raise InvalidValueError(annotation.path,
                                f"degenerate landmarks (extent {extent.round(2).tolist()} px)")


def _check_in_image(image: EncodedImage, landmarks: np.ndarray) -> None:
    """Refuse (InvalidValueError) landmarks (3, 68) that lie outside the image by more than
    LANDMARKS_OUTSIDE_MAX of the face's size: the image is not the one the .mat describes."""
    x, y = landmarks[0], landmarks[1]
    margin = LANDMARKS_OUTSIDE_MAX * np.ptp(landmarks[:2], axis=1).max()
    if (x.min() >= 1 - margin and y.min() >= 1 - margin
            and x.max() <= image.width + margin and y.max() <= image.height + margin):
        return
    # The .mat places rows from the image's bottom edge: the height it needs is its highest row.
    needed = f"{int(np.ceil(x.max()))}x{int(np.ceil(reflect(y.min(), image.height)))}"
    raise InvalidValueError(
        image.path, f"image is {image.width}x{image.height} px but its annotation's landmarks need "
                    f"{needed} px (they span x {x.min():.0f}..{x.max():.0f}, y {y.min():.0f}..{y.max():.0f} "
                    f"here, more than {LANDMARKS_OUTSIDE_MAX:.0%} of the face outside): not the image "
                    "the .mat was made for (resized?)")


def relative_path(path: str, root: str) -> str:
    """``path`` relative to the dataset root ``root`` (as quarantine tables name files)."""
    return path[len(root) + 1:] if path.startswith(root + "/") else path


@dataclass
class ShardJob:
    """One shard's sources and where its files go (plain data, sent to a Ray task)."""

    index: int
    refs: list[SampleRef]
    root: str  # paths on their filesystems
    output: str
    kind: Literal["train", "aflw2000"]
    # Where the two are (a folder, or a URI such as s3://bucket/prefix): each task opens the
    # filesystems from these; empty for local folders.
    root_location: str = ""
    output_location: str = ""

    def filesystems(self) -> tuple[pafs.FileSystem, pafs.FileSystem]:
        """(the input's filesystem, the output's)."""
        return resolve(self.root_location or self.root)[0], resolve(self.output_location or self.output)[0]

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.index:05d}"

    def sources_digest(self) -> str:
        names = "\n".join(ref.mat_path for ref in self.refs)
        return "sha256:" + hashlib.sha256(names.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Face:
    """One source that read, decoded and passed the landmark check, with its arrays."""

    ref: SampleRef
    source: str  # the .mat, relative to the input root
    annotation: MatAnnotation
    image: EncodedImage  # decoded only when its crops are rendered
    pose: np.ndarray  # (7,) Pose_Para
    params: np.ndarray  # (62,) shape and expression parameters, P zero
    truth: np.ndarray  # (3, 68) landmarks in image coordinates

    @property
    def stem(self) -> str:
        return self.source.rsplit(".", 1)[0]

    @property
    def stream_key(self) -> int:
        """A 32-bit key of the source's name: its augmentation stream's seed."""
        return int.from_bytes(hashlib.sha256(self.stem.encode()).digest()[:4], "big")


# One crop and where it goes: (output key, crop, columns of its own beyond the common ones).
CropOutput = tuple[str, AugmentedCrop, dict[str, Any]]


class ShardProcessor:
    """Turns one shard's source files into its Parquet files. Built once per task."""

    def __init__(self, config: PreprocessConfig, strict: bool, model: MorphableModel) -> None:
        self.config = config
        self.strict = strict
        self.model = model
        needs_mirror = config.augment.geometric.flip_probability > 0
        self.mirror = mirror_map(self.model) if needs_mirror else None

    def __call__(self, job: ShardJob) -> dict[str, Any]:
        source, filesystem = job.filesystems()
        root = job.root
        name = f"part-{job.index:05d}.parquet"
        if job.kind == "aflw2000":
            writers = {"aflw2000": AtomicParquetWriter(
                filesystem, f"{job.output}/aflw2000/{name}", evaluation_schema(self.config.image_format))}
        else:
            schema = training_schema(self.config.image_format)
            writers = {s: AtomicParquetWriter(filesystem, f"{job.output}/{s}/{name}", schema) for s in SPLITS}
        folder = "aflw2000-quarantine" if job.kind == "aflw2000" else "quarantine"
        writers["quarantine"] = AtomicParquetWriter(
            filesystem, f"{job.output}/{folder}/{name}", QUARANTINE_SCHEMA)
        summary = {"shard": job.index, "kind": job.kind, "inputs": len(job.refs), "written": 0,
                   "quarantined": 0, "rows": {}, "by_subset": {}}
        train_labels: list[np.ndarray] = []  # (N, 62) float32 per batch, as stored
        try:
            for start in range(0, len(job.refs), self.config.batch_size):
                batch = job.refs[start:start + self.config.batch_size]
                self._process_batch(source, root, job, batch, writers, summary, train_labels)
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        for key, writer in writers.items():
            writer.close()
            if key != "quarantine":
                summary["rows"][key] = writer.rows
        labels = np.concatenate(train_labels) if train_labels else np.zeros((0, NUM_PARAMS), np.float32)
        moments = label_moments({"label": labels})
        summary["moments"] = {key: value[0].tolist() if key != "count" else int(value[0])
                              for key, value in moments.items()}
        return summary

    def _process_batch(self, filesystem, root, job, batch, writers, summary, train_labels) -> None:
        quarantined: list[dict] = []

        def quarantine(err: DatasetError) -> None:
            if self.strict:
                raise err
            quarantined.append({"file": relative_path(err.path, root), "stage": err.stage,
                                "reason": err.reason})
            summary["quarantined"] += 1

        faces = self._read_faces(filesystem, root, batch, quarantine)
        if job.kind == "aflw2000":
            produced = []
            for face in faces:
                try:
                    produced.append((face, [("aflw2000", *self._evaluation_crop(face))]))
                except DatasetError as err:
                    quarantine(err)
        else:
            produced = self._training_crops(faces, quarantine)
        outputs: dict[str, list[tuple[Face, AugmentedCrop, dict]]] = {}
        for face, crops in produced:
            for key, crop, extra in crops:
                outputs.setdefault(key, []).append((face, crop, extra))
            summary["written"] += 1
            folder = face.ref.subset + ("_Flip" if face.ref.flipped else "")
            summary["by_subset"][folder] = summary["by_subset"].get(folder, 0) + 1
        for key, entries in outputs.items():
            columns = self._columns(entries)
            writers[key].write_columns(columns)
            if key == "train":
                train_labels.append(columns["label"])
        writers["quarantine"].write_rows(quarantined)

    def _read_faces(self, filesystem, root: str, batch: list[SampleRef], quarantine) -> list[Face]:
        """Read a batch of sources and their image headers (nothing decoded) and check them; a bad
        one goes to ``quarantine``."""
        read = []
        max_side = self.config.max_image_side
        for ref in batch:
            try:
                annotation = read_annotation(filesystem, ref)
                read.append((ref, annotation, read_encoded_image(filesystem, ref, max_side)))
            except DatasetError as err:
                quarantine(err)
        if not read:
            return []
        poses, params = annotation_arrays([annotation for _, annotation, _ in read])
        heights = np.array([image.height for _, _, image in read])
        truths = posed_landmarks(self.model, poses, params, heights)
        faces = []
        for (ref, annotation, image), pose, param, truth in zip(read, poses, params, truths, strict=True):
            try:
                _check_face(annotation, truth)
                _check_in_image(image, truth)
            except DatasetError as err:
                quarantine(err)
                continue
            source = relative_path(ref.mat_path, root)
            faces.append(Face(ref, source, annotation, image, pose, param, truth))
        return faces

    def _training_crops(self, faces: list[Face], quarantine) -> list[tuple[Face, list[CropOutput]]]:
        """The augmented crops of a batch of checked faces, their geometry planned all at once,
        each with the split it goes to."""
        if not faces:
            return []
        boxes = landmark_crop_box(np.stack([face.truth for face in faces]))
        heights = np.array([face.image.height for face in faces])
        base_labels = labels_from_poses(np.stack([face.pose for face in faces]),
                                        np.stack([face.params for face in faces]), boxes, heights)
        # Each source's own stream, so its crops never depend on which shard or task ran it.
        rngs = [np.random.default_rng([self.config.seed, face.stream_key]) for face in faces]
        plan = plan_crops(base_labels, boxes, self.config.augment, rngs, self.mirror)
        finite = np.isfinite(plan.labels).all(axis=(1, 2))
        produced = []
        for k, face in enumerate(faces):
            if not finite[k]:
                quarantine(InvalidValueError(face.annotation.path, "label holds NaN or inf"))
                continue
            try:
                image = face.image.decode()  # one decoded image alive at a time
            except DatasetError as err:
                quarantine(err)
                continue
            split = split_of(face.ref.subject_id, self.config.val_fraction)
            crops = render_crops(image, plan, k, self.config.augment.photometric, rngs[k])
            del image
            produced.append((face, [(split, crop, {}) for crop in crops]))
        return produced

    def _columns(self, entries: list[tuple[Face, AugmentedCrop, dict]]) -> dict[str, Any]:
        """The rows of one output file from a batch, column by column: every crop encoded, and
        what follows from its label (landmarks, angles) computed for all rows at once. An entry's
        ``extra`` holds columns of its own (an evaluation row's ground truth, and its id)."""
        labels = np.stack([crop.label for _, crop, _ in entries])
        angles = pose_angles(labels).astype(np.float32)
        image_format, quality = self.config.image_format, self.config.jpeg_quality
        columns = {
            "id": [f"{face.stem}#{crop.index}" for face, crop, _ in entries],
            "source_file": [face.source for face, _, _ in entries],
            "subset": [face.ref.subset for face, _, _ in entries],
            "subject_id": [face.ref.subject_id for face, _, _ in entries],
            "augmentation_index": [crop.index for _, crop, _ in entries],
            "flipped": [crop.flipped for _, crop, _ in entries],
            "image": [encode_image(crop.image, image_format, quality) for _, crop, _ in entries],
            "label": labels.astype(np.float32),  # (N, 62)
            "landmarks": crop_landmarks(self.model, labels).astype(np.float32),  # (N, 3, 68)
            "pitch": angles[:, 0], "yaw": angles[:, 1], "roll": angles[:, 2],
        }
        for name in entries[0][2]:
            columns[name] = [extra[name] for _, _, extra in entries]
        return columns

    def _evaluation_crop(self, face: Face) -> tuple[AugmentedCrop, dict]:
        """The benchmark's ROI crop of an AFLW2000-3D face, with its ground-truth columns."""
        annotation = face.annotation
        if annotation.pt3d_68 is None:
            raise InvalidValueError(annotation.path, "field 'pt3d_68' is missing")
        box = landmark_crop_box(annotation.pt3d_68)  # the benchmark's ROI rule
        label = label_from_annotation(annotation, box, face.image.height)
        image = face.image.decode()
        yaw = abs(np.rad2deg(canonical_angles(annotation.pose_para)[1]))
        pt2d = annotation.pt2d if annotation.pt2d is not None and annotation.pt2d.shape == (2, 21) \
            else np.full((2, 21), -1.0)
        crop = AugmentedCrop(index=0, image=crop_image(image, box), label=label,
                             transform=box_transform(box), flipped=False)
        return crop, {
            "id": face.stem, "roi_box": box, "pt3d_68": annotation.pt3d_68, "pt2d": pt2d,
            "yaw_bin": int(min(np.searchsorted([30.0, 60.0], yaw, side="left"), 2)),
        }


def shard_jobs(refs: list[SampleRef], root: str, output: str, per_shard: int, kind: str) -> list[ShardJob]:
    """``refs`` cut into shards of ``per_shard`` sources, in the order given; ``root`` and
    ``output`` are locations (folders or URIs)."""
    (_, root_path), (_, output_path) = resolve(root), resolve(output)
    uri = {"root_location": root if "://" in root else "",
           "output_location": output if "://" in output else ""}
    return [ShardJob(index=k, refs=refs[start:start + per_shard], root=root_path, output=output_path,
                     kind=kind, **uri)
            for k, start in enumerate(range(0, len(refs), per_shard))]


def dealt_sources(refs: list[SampleRef], config: PreprocessConfig) -> list[SampleRef]:
    """The training sources in the order they are cut into shards: a permutation seeded by the
    config when it shuffles sources, else as listed. The split stays by subject (a hash of the
    id), so the order changes which shard a face lands in, never its split."""
    if not config.shuffle_sources:
        return list(refs)
    order = np.random.default_rng([config.seed, len(refs)]).permutation(len(refs))
    return [refs[k] for k in order]


def combine_stats(partials: list[dict]) -> ParamStats:
    """Merge per-batch (count, mean, M2) of the 62-d label (Chan et al.'s parallel variance)."""
    count, mean, m2 = 0, np.zeros(NUM_PARAMS), np.zeros(NUM_PARAMS)
    for part in partials:
        n_b, mean_b, m2_b = part["count"], np.asarray(part["mean"]), np.asarray(part["m2"])
        if n_b == 0:
            continue
        delta = mean_b - mean
        total = count + n_b
        mean = mean + delta * n_b / total
        m2 = m2 + m2_b + delta**2 * count * n_b / total
        count = total
    if count == 0:
        raise ValueError("no training rows to compute whitening statistics from")
    return ParamStats(mean, np.maximum(np.sqrt(m2 / count), 1e-8))


def label_moments(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One batch's (count, mean, M2) of the label column, for :func:`combine_stats`; each as a
    one-row column (the shape of a Ray Data batch)."""
    labels = np.array(batch["label"], dtype=np.float64).reshape(-1, NUM_PARAMS)
    mean = labels.mean(axis=0) if len(labels) else np.zeros(NUM_PARAMS)
    m2 = ((labels - mean) ** 2).sum(axis=0)
    return {"count": np.array([len(labels)]), "mean": mean[None], "m2": m2[None]}


def write_json(filesystem: pafs.FileSystem, path: str, data: dict) -> None:
    write_bytes_atomic(filesystem, path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def process_shards(batch: dict[str, np.ndarray], jobs: dict[str, ShardJob], config: PreprocessConfig,
                   strict: bool, model: list[ray.ObjectRef]) -> dict[str, list[str]]:
    """The Ray Data task: ``batch`` holds shard keys; each shard is processed in full and its
    completion record written. The morphable model comes from the driver through the object store
    (``model`` holds its reference), never from a path on this node. A task, not an actor: Ray
    Data keeps an actor pool's constructor arguments in the object store, which Ray reports as an
    error for every restartable actor."""
    # The tasks are the parallelism: OpenCV's own thread pool would only oversubscribe the cores
    # Ray gave this one.
    cv2.setNumThreads(max(1, int(config.num_cpus_per_task)))
    processor = ShardProcessor(config, strict, ray.get(model[0]))
    worker = f"{socket.gethostname()}:{os.getpid()}"  # in each shard's record
    summaries = []
    for key in batch["key"]:
        job = jobs[str(key)]
        started = time.time()
        try:
            summary = processor(job)
        except DatasetError as err:
            if not strict:
                raise
            # --strict: the bad file goes back as data, not as a task failure that Ray Data would
            # log and wrap; the driver raises it (see stopped_at). No completion record.
            summaries.append(json.dumps({"kind": job.kind, "shard": job.index, "stopped_at": {
                "file": err.path, "stage": err.stage, "reason": err.reason}}))
            break
        summary["started_at"], summary["finished_at"] = started, time.time()
        summary["worker"] = worker
        record = {**summary, "config_digest": processor.config.digest(),
                  "sources_digest": job.sources_digest()}
        write_json(job.filesystems()[1], f"{job.output}/_shards/{job.key}.json", record)
        summaries.append(json.dumps(record))
    return {"summary": summaries}


def stopped_at(record: dict) -> DatasetError | None:
    """The bad file a ``--strict`` shard task stopped at, or None for a finished shard."""
    stop = record.get("stopped_at")
    return None if stop is None else DatasetError(stop["file"], stop["reason"], stage=stop["stage"])


def finished_record(filesystem: pafs.FileSystem, job: ShardJob, config_digest: str) -> dict | None:
    """The completion record of a shard written by this config from these sources, else None."""
    path = f"{job.output}/_shards/{job.key}.json"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        record = json.loads(stream.read())
    same_config = record.get("config_digest") == config_digest
    return record if same_config and record.get("sources_digest") == job.sources_digest() else None
