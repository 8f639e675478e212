"""Scoring a predictor on benchmark faces: the one route from cropped faces to the NME tables.

    faces (crops by the benchmark rule, boxes, ground truth) -> network -> parameters ->
    landmarks mapped back through each box into image pixels -> NME -> table by |yaw| bin

The faces come from the AFLW2000-3D image folder (``frnet evaluate``), from the evaluation
shards (training's evaluation gate, the sweep's, the ablation benchmark) or from AFLW's crops;
all are scored by :func:`predict_faces` and tabulated by :func:`models.metrics.aflw2000_report`.

Each AFLW2000-3D evaluation also names what it was measured on (:class:`EvaluationSet`): two
NMEs are comparable only when their sets agree (docs/evaluation.md, "The champion").
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from models.frame import nme, param_frame_to_image
from models.metrics import MISSING_POINT, aflw2000_report, nme_21, reconstruction_nme
from models.predictor import FacePredictor
from pipeline.data.shard_reader import check_evaluation_shards, evaluation_batches, evaluation_count
from preprocessing.benchmark_sets import (
    AFLW2000_ARRAYS,
    Aflw2000Protocol,
    AflwSet,
    FaceBatch,
    aflw2000_batches,
    aflw_batches,
)
from preprocessing.datasets import SampleRef, read_bytes
from preprocessing.labels import label_from_annotation
from preprocessing.manifest import Manifest

Progress = Callable[[int, int], None]
# What an AFLW2000-3D NME means: the 68-point NME (bounding-box normaliser) by the landmark crop
# rule, averaged over the three |yaw| bins. Raise the version whenever scoring changes what that
# figure measures (crop rule, normaliser, bins), so that older figures stop being compared.
SCORING_PROTOCOL = "aflw2000-3d-nme68-yaw-bins/1"
SET_TAGS = {"digest": "evaluation.set_digest", "images": "evaluation.images",
            "protocol": "evaluation.protocol"}


def _no_progress(done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class FacePredictions:
    """What a predictor gave on benchmark faces, with the ground truth beside it.

    Attributes: stems (N,); boxes (N, 4) crop boxes; params (N, 62) de-whitened; predicted and
    truth (N, 3, 68) landmarks in image pixels; yaw_deg (N,) degrees; annotations and
    image_heights as the faces' batches carried them (folder reads only); reconstruction (N,)
    3D NME where a dense model was scored on the image folder, else None.
    """

    stems: list[str]
    boxes: np.ndarray
    params: np.ndarray
    predicted: np.ndarray
    truth: np.ndarray
    yaw_deg: np.ndarray
    annotations: tuple = ()
    image_heights: tuple[int, ...] = ()
    reconstruction: np.ndarray | None = None


@dataclass(frozen=True)
class EvaluationSet:
    """What an NME was measured on: ``digest`` (sha256, hex) of the faces' sorted names and their
    annotations' contents, ``images`` how many faces, ``protocol`` how they were scored
    (:data:`SCORING_PROTOCOL`, where the crops came from and which yaw binned them)."""

    digest: str
    images: int
    protocol: str

    @property
    def short(self) -> str:
        return self.digest[:12]

    @property
    def crops(self) -> str:
        """Where the scored crops came from: ``images``, or ``shards:FORMAT`` (the protocol's field)."""
        return self.protocol.split("crops=")[-1].split()[0]

    def tags(self) -> dict[str, str]:
        """As the model-version tags :data:`SET_TAGS` names."""
        return {SET_TAGS["digest"]: self.digest, SET_TAGS["images"]: str(self.images),
                SET_TAGS["protocol"]: self.protocol}

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "images": self.images, "protocol": self.protocol}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> EvaluationSet | None:
        """The set a version's tags record, or None where it has none (registered before sets
        were recorded, or unscored)."""
        if not all(tag in tags for tag in SET_TAGS.values()):
            return None
        return cls(tags[SET_TAGS["digest"]], int(tags[SET_TAGS["images"]]), tags[SET_TAGS["protocol"]])


def aflw2000_folder_set(filesystem: pafs.FileSystem, refs: list[SampleRef],
                        protocol: Aflw2000Protocol | None, yaw_file: str | None) -> EvaluationSet:
    """The set of an AFLW2000-3D image folder: every image and annotation name in sorted order
    with the sha256 of each ``.mat`` file, and the yaw values when 3DDFA's arrays bin them."""
    digest = hashlib.sha256()
    for ref in sorted(refs, key=lambda ref: ref.stem):
        annotation = hashlib.sha256(read_bytes(filesystem, ref.mat_path)).hexdigest()
        digest.update(f"{PurePosixPath(ref.image_path).name}\t{PurePosixPath(ref.mat_path).name}\t"
                      f"{annotation}\n".encode())
    yaw = "mat"
    if protocol is not None and yaw_file is not None:
        yaw = AFLW2000_ARRAYS[f"yaw_{yaw_file}"]
        digest.update(np.ascontiguousarray(getattr(protocol, f"yaw_{yaw_file}"), np.float64).tobytes())
    return EvaluationSet(digest.hexdigest(), len(refs), f"{SCORING_PROTOCOL} crops=images yaw={yaw}")


def shards_set(predictions: FacePredictions, image_format: str) -> EvaluationSet:
    """The set of the evaluation shards: every face id in sorted order with its annotation as the
    shards store it (crop box, ``pt3d_68``, yaw)."""
    digest = hashlib.sha256()
    for i in sorted(range(len(predictions.stems)), key=lambda i: predictions.stems[i]):
        digest.update(f"{predictions.stems[i]}\t".encode())
        for values in (predictions.boxes[i], predictions.truth[i], predictions.yaw_deg[i]):
            digest.update(np.ascontiguousarray(values, np.float64).tobytes())
    return EvaluationSet(digest.hexdigest(), len(predictions.stems),
                         f"{SCORING_PROTOCOL} crops=shards:{image_format} yaw=mat")


def vertices_in_image(predictor: FacePredictor, params: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Every model vertex (3, N) of a parameter (62,) of the crop ``box``, in image pixels."""
    return param_frame_to_image(predictor.model.vertices(params), box)


def landmarks_in_image(predictor: FacePredictor, params: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The 68 landmarks (3, 68) of a parameter (62,) of the crop ``box``, in image pixels."""
    return param_frame_to_image(predictor.model.landmarks(params), box)


def predict_faces(predictor: FacePredictor, batches: Iterable[FaceBatch], total: int,
                  progress: Progress = _no_progress) -> FacePredictions:
    """Predict every face of ``batches`` (``total`` in all, for progress) and map it back."""
    stems, boxes, params, predicted, truth, yaws, annotations, heights = [], [], [], [], [], [], [], []
    for batch in batches:
        batch_params = predictor.predict_params(batch.crops)  # (B, 62)
        for param, box in zip(batch_params, batch.boxes, strict=True):
            predicted.append(landmarks_in_image(predictor, param, box))
        stems += batch.stems
        boxes.append(batch.boxes)
        params.append(batch_params)
        truth.append(batch.truth)
        yaws.append(batch.yaw_deg)
        annotations += batch.annotations
        heights += batch.image_heights
        progress(len(stems), total)
    if not stems:
        raise ValueError("no faces to score")
    return FacePredictions(
        stems=stems, boxes=np.concatenate(boxes), params=np.concatenate(params),
        predicted=np.array(predicted), truth=np.concatenate(truth), yaw_deg=np.concatenate(yaws),
        annotations=tuple(annotations), image_heights=tuple(heights),
    )


def landmark_report(predictions: FacePredictions, truth: np.ndarray | None = None,
                    yaw_deg: np.ndarray | None = None) -> dict[str, Any]:
    """The 68-point NME table (see :func:`models.metrics.aflw2000_report`) against the
    predictions' own ground truth, or ``truth`` (N, 2+, 68), binned by their yaw or ``yaw_deg``."""
    truth = predictions.truth if truth is None else truth
    yaw_deg = predictions.yaw_deg if yaw_deg is None else yaw_deg
    return aflw2000_report(nme(predictions.predicted, truth), yaw_deg, predictions.stems)


def score_shards(predictor: FacePredictor, shards: str, manifest: Manifest,
                 batch_size: int = 64) -> dict[str, Any]:
    """The AFLW2000-3D table of a predictor on the evaluation shards ``frnet preprocess
    --aflw2000`` wrote (crops by the benchmark rule, ground truth ``pt3d_68``)."""
    return score_shards_on_set(predictor, shards, manifest, batch_size)[0]


def score_shards_on_set(predictor: FacePredictor, shards: str, manifest: Manifest,
                        batch_size: int = 64) -> tuple[dict[str, Any], EvaluationSet]:
    """:func:`score_shards`, and the set it was measured on. The shards are checked first
    (:func:`check_evaluation_shards`: their rows against the manifest, its morphable model
    against the predictor's)."""
    check_evaluation_shards(shards, manifest, predictor.model.identity)
    batches = evaluation_batches(shards, manifest, batch_size)
    predictions = predict_faces(predictor, batches, evaluation_count(manifest))
    return landmark_report(predictions), shards_set(predictions, manifest.image_format)


def predict_aflw2000(predictor: FacePredictor, filesystem: pafs.FileSystem, refs: list[SampleRef],
                     batch_size: int, progress: Progress = _no_progress,
                     protocol: Aflw2000Protocol | None = None) -> FacePredictions:
    """The AFLW2000-3D image folder's faces predicted (with ``protocol``, each file checked
    against its row first), and the 3D reconstruction NME where the morphable model is dense."""
    batches = aflw2000_batches(filesystem, refs, batch_size, protocol)
    predictions = predict_faces(predictor, batches, len(refs), progress)
    if not predictor.model.is_dense:
        return predictions
    return replace(predictions, reconstruction=reconstruction_errors(predictor, predictions))


def reconstruction_errors(predictor: FacePredictor, predictions: FacePredictions) -> np.ndarray:
    """3D reconstruction NME (N,) of a dense model: each predicted mesh against the .mat's
    ground-truth mesh, put through the same label and decoder (the label reproduces the .mat's
    image-space geometry exactly, :mod:`preprocessing.labels`)."""
    errors = []
    for i, annotation in enumerate(predictions.annotations):
        box = predictions.boxes[i]
        label = label_from_annotation(annotation, box, predictions.image_heights[i])
        errors.append(reconstruction_nme(vertices_in_image(predictor, predictions.params[i], box),
                                         vertices_in_image(predictor, label, box), annotation.pt3d_68))
    return np.array(errors)


def aflw2000_reports(
    predictions: FacePredictions, protocol: Aflw2000Protocol | None, yaw_file: str | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The AFLW2000-3D reports of faces read from the image folder, and what each one compared
    against: the .mat's 68 points, with ``protocol`` the reannotated ones, AFLW's 21 points, and
    for a dense morphable model the 3D reconstruction."""
    stems = predictions.stems
    sources = {"aflw2000": "original: pt3d_68 of the .mat files"}
    yaw, sources["yaw"] = predictions.yaw_deg, "the .mat files' Pose_Para (canonical angles)"
    if protocol is not None and yaw_file is not None:
        key = f"yaw_{yaw_file}"
        yaw, sources["yaw"] = getattr(protocol, key), str(protocol.folder / AFLW2000_ARRAYS[key])
    reports = {"aflw2000": landmark_report(predictions, yaw_deg=yaw)}
    if protocol is not None:
        reports["aflw2000_reannotated"] = landmark_report(predictions, protocol.reannotated, yaw)
        sources["aflw2000_reannotated"] = str(protocol.folder / AFLW2000_ARRAYS["reannotated"])
        points_21 = list(protocol.pts21)
        sources["aflw21"] = str(protocol.folder / AFLW2000_ARRAYS["pts21"])
    else:
        points_21 = [a.pt2d if a.pt2d is not None and a.pt2d.shape == (2, 21) else None
                     for a in predictions.annotations]
        sources["aflw21"] = "pt2d of the .mat files"
    usable = [i for i, points in enumerate(points_21) if points is not None
              and np.any((points[0] != MISSING_POINT) & (points[1] != MISSING_POINT))]
    if usable:
        errors_21 = [nme_21(predictions.predicted[i], points_21[i], predictions.truth[i]) for i in usable]
        reports["aflw21"] = aflw2000_report(np.array(errors_21), yaw[usable], [stems[i] for i in usable])
        sources["aflw21"] += f" ({len(usable)} of {len(stems)} faces with visible points)"
    else:
        del sources["aflw21"]
    if predictions.reconstruction is not None:
        reports["reconstruction_3d"] = aflw2000_report(predictions.reconstruction, yaw, stems)
        sources["reconstruction_3d"] = ".mat Shape_Para[:40], Exp_Para[:10], Pose_Para through the model"
    return reports, sources


def score_aflw(predictor: FacePredictor, aflw: AflwSet, batch_size: int,
               progress: Progress = _no_progress) -> dict[str, Any]:
    """The AFLW table: predicted landmarks mapped through each ROI box, 21-point NME by yaw bin."""
    errors = []
    for rows, crops in aflw_batches(aflw, batch_size):
        for i, param in zip(rows, predictor.predict_params(crops), strict=True):
            landmarks = landmarks_in_image(predictor, param, aflw.roi_box[i])
            errors.append(nme_21(landmarks, aflw.pts21[i], None if aflw.pts68 is None else aflw.pts68[i]))
        progress(rows.stop, len(aflw.names))
    stems = [str(PurePosixPath(name).with_suffix("")) for name in aflw.names]
    return aflw2000_report(np.array(errors), aflw.yaw, stems)
