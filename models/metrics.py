"""Benchmark figures of face alignment: NME by |yaw| bin, AFLW's 21 points, 3D reconstruction.

Protocols (see ``docs/3dmm-conventions.md`` in the shared docs and 3DDFA's benchmark scripts):

- 2D landmarks: ``NME_i = mean_k ||p_k - g_k|| / sqrt(w * h)``, w and h the extent of the
  ground-truth 68-point 2D bbox (:func:`models.frame.nme`).
- Faces are binned on |yaw| in degrees: [0, 30], (30, 60], (60, 90]. The headline Mean and Std
  are the mean and the population std (``ddof=0``, as the papers) of the three bin means, so a
  profile face weighs more than a frontal one.
- AFLW's 21 points: the 68 predicted landmarks are reduced with :data:`AFLW21_FROM_68`; points
  annotated ``-1`` (invisible) are skipped.
- 3D reconstruction (2DASL's protocol): both dense meshes shifted to z >= 0, every 50th vertex
  kept, rigidly aligned, mean 3D point error over sqrt(w * h) of the ground-truth 2D landmark bbox.

Every figure here is a fraction (0.0278, not 2.78 %); printing multiplies by 100.
numpy only, no I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.frame import nme_normaliser

# Upper edges of the first two |yaw| bins in degrees; the third bin takes everything above 60,
# as 3DDFA's ``ana`` does (its AFLW2000-3D.pose.npy holds a few |yaw| > 90 that land there).
YAW_BIN_EDGES_DEG = (30.0, 60.0)
YAW_BIN_LABELS = ("[0,30]", "(30,60]", "(60,90]")
# iBUG 68 -> AFLW 21 points (1-based ids, each list averaged), from 3DDFA's AFLW benchmark.
AFLW21_FROM_68: tuple[tuple[int, ...], ...] = (
    (18,), (20,), (22,), (23,), (25,), (27,), (37,), tuple(range(37, 43)), (40,), (43,),
    tuple(range(43, 49)), (46,), (3,), (32,), (31,), (36,), (15,), (49,), tuple(range(61, 69)),
    (55,), (9,),
)
# AFLW marks an invisible point with this value in both coordinates (sometimes only in one).
MISSING_POINT = -1.0
# 2DASL keeps every 50th vertex of the dense mesh for the 3D reconstruction NME.
RECONSTRUCTION_STEP = 50


def yaw_bins(yaw_deg: np.ndarray) -> np.ndarray:
    """Bin index (N,) int in {0, 1, 2} of yaw angles (N,) in degrees, on |yaw|.

    30 falls in bin 0 and 60 in bin 1 (upper edges are inclusive); anything above 60 is bin 2.
    """
    yaw = np.abs(np.asarray(yaw_deg, dtype=np.float64))
    if not np.all(np.isfinite(yaw)):
        raise ValueError("yaw angles hold NaN or inf")
    # side="left": a value equal to an edge belongs to the bin below it.
    return np.searchsorted(np.asarray(YAW_BIN_EDGES_DEG), yaw, side="left")


def aflw2000_report(nme_per_image: np.ndarray, yaw_deg: np.ndarray, stems: list[str]) -> dict[str, Any]:
    """The benchmark table of per-image errors, as JSON-ready numbers.

    Args:
        nme_per_image: (N,) NME of each image, a fraction.
        yaw_deg: (N,) yaw of each image in degrees (the sign is ignored).
        stems: N distinct image names, in the same order.

    Returns ``{"nme_mean_of_bins", "nme_std_of_bins", "nme_per_sample_mean", "bins", "per_image"}``:
    the mean and population std of the bin means, the plain mean over images, one
    ``{"range", "count", "mean"}`` per |yaw| bin, and ``stem -> NME``. An empty bin has mean
    ``None`` and the summary is taken over the bins that hold images.
    """
    errors = np.asarray(nme_per_image, dtype=np.float64)
    yaw = np.asarray(yaw_deg, dtype=np.float64)
    if errors.ndim != 1 or yaw.shape != errors.shape or len(stems) != len(errors):
        raise ValueError(f"expected N errors, N yaws and N stems; got shapes {errors.shape}, "
                         f"{yaw.shape} and {len(stems)} stems")
    if len(errors) == 0:
        raise ValueError("no images to report on")
    if not np.all(np.isfinite(errors)):
        raise ValueError("per-image NME holds NaN or inf")
    if len(set(stems)) != len(stems):
        raise ValueError("image stems must be distinct")
    bins = yaw_bins(yaw)
    rows = []
    for index, label in enumerate(YAW_BIN_LABELS):
        members = errors[bins == index]
        rows.append({"range": label, "count": int(members.size),
                     "mean": float(members.mean()) if members.size else None})
    means = np.array([row["mean"] for row in rows if row["mean"] is not None])
    return {
        "nme_mean_of_bins": float(means.mean()),
        "nme_std_of_bins": float(means.std()),
        "nme_per_sample_mean": float(errors.mean()),
        "bins": rows,
        "per_image": {stem: float(value) for stem, value in zip(stems, errors, strict=True)},
    }


def aflw21_from_68(landmarks: np.ndarray) -> np.ndarray:
    """AFLW's 21 points from iBUG 68 landmarks: (..., D, 68) -> (..., D, 21)."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape[-1] != 68:
        raise ValueError(f"expected 68 landmarks in the last axis, got shape {landmarks.shape}")
    return np.stack([landmarks[..., [i - 1 for i in ids]].mean(axis=-1) for ids in AFLW21_FROM_68],
                    axis=-1)


def _bbox_scale(points: np.ndarray) -> float:
    """sqrt(w * h) of the 2D bbox of points (2+, K)."""
    scale = float(nme_normaliser(points))
    if not scale > 0:
        raise ValueError("degenerate ground truth: its 2D bbox has no area")
    return scale


def nme_21(predicted_68: np.ndarray, truth_21: np.ndarray, truth_68: np.ndarray | None = None) -> float:
    """AFLW-style 21-point NME of one face (a fraction).

    Args:
        predicted_68: (2+, 68) predicted landmarks, image pixels.
        truth_21: (2, 21) annotated points; a point with -1 in either coordinate is skipped.
        truth_68: (2+, 68) ground-truth 68 landmarks whose 2D bbox gives the normaliser (the
            protocol's); without them the bbox of the visible 21 points is used.
    """
    truth_21 = np.asarray(truth_21, dtype=np.float64)
    if truth_21.shape != (2, 21):
        raise ValueError(f"expected 21 ground-truth points of shape (2, 21), got {truth_21.shape}")
    visible = (truth_21[0] != MISSING_POINT) & (truth_21[1] != MISSING_POINT)
    if not visible.any():
        raise ValueError("no visible ground-truth point (all are -1)")
    predicted_21 = aflw21_from_68(np.asarray(predicted_68, dtype=np.float64)[:2])
    distances = np.linalg.norm(predicted_21[:, visible] - truth_21[:, visible], axis=0)
    reference = truth_21[:, visible] if truth_68 is None else np.asarray(truth_68, dtype=np.float64)
    return float(distances.mean() / _bbox_scale(reference))


def rigid_align(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rotation and translation taking ``source`` onto ``target`` (Kabsch).

    Both are (3, N) with column k of one matching column k of the other. Returns ``R`` (3, 3),
    a proper rotation (det +1), and ``t`` (3,) minimising ``sum_k ||R s_k + t - g_k||^2``.
    ICP alternates nearest-neighbour matching with exactly this step; when the correspondences
    are known (two meshes of one topology) the matching never changes, so this single solve is
    the fixed point ICP would converge to.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[0] != 3:
        raise ValueError(f"expected two (3, N) point sets, got {source.shape} and {target.shape}")
    source_centre = source.mean(axis=1, keepdims=True)
    target_centre = target.mean(axis=1, keepdims=True)
    covariance = (source - source_centre) @ (target - target_centre).T  # (3, 3)
    u, _, vt = np.linalg.svd(covariance)
    # A reflection can fit better than any rotation (e.g. flat point sets); forbid it.
    reflection = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rotation = vt.T @ np.diag([1.0, 1.0, reflection]) @ u.T
    translation = (target_centre - rotation @ source_centre)[:, 0]
    return rotation, translation


def reconstruction_nme(
    predicted_vertices: np.ndarray, truth_vertices: np.ndarray, truth_landmarks: np.ndarray,
    step: int = RECONSTRUCTION_STEP,
) -> float:
    """3D face reconstruction NME of one face (2DASL's protocol), a fraction.

    Args:
        predicted_vertices: (3, N) predicted dense mesh, image pixels (z scaled like x and y).
        truth_vertices: (3, N) ground-truth mesh of the same topology, same units.
        truth_landmarks: (2+, 68) ground-truth landmarks; sqrt(w * h) of their 2D bbox normalises.
        step: keep every ``step``-th vertex.

    Both meshes are shifted so that their smallest z is 0 (as the protocol states; after the
    translation of the rigid alignment this changes nothing), subsampled, the prediction is
    aligned onto the truth with :func:`rigid_align`, and the mean point distance is normalised.
    """
    predicted = np.array(predicted_vertices, dtype=np.float64)
    truth = np.array(truth_vertices, dtype=np.float64)
    if predicted.shape != truth.shape or predicted.ndim != 2 or predicted.shape[0] != 3:
        raise ValueError(f"expected two (3, N) meshes of one topology, got {predicted.shape} and "
                         f"{truth.shape}")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    predicted[2] -= predicted[2].min()
    truth[2] -= truth[2].min()
    predicted, truth = predicted[:, ::step], truth[:, ::step]
    rotation, translation = rigid_align(predicted, truth)
    aligned = rotation @ predicted + translation[:, None]
    return float(np.linalg.norm(aligned - truth, axis=0).mean() / _bbox_scale(truth_landmarks))
