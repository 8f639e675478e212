"""Checks a dataset folder end to end: read -> 62-d label -> 68 landmarks -> back to the image.

Used by ``frnet demo`` and the tests on synthetic folders, whose .mat parameters describe the
image exactly: the label's landmarks must land on the .mat's own image-space landmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.frame import crop_image, landmark_crop_box
from models.morphable import MorphableModel
from preprocessing.datasets import list_300w_lp, list_aflw2000, read_annotation, read_image
from preprocessing.errors import DatasetError
from preprocessing.labels import crop_landmarks, image_landmarks, label_from_annotation, landmarks_in_image


@dataclass(frozen=True)
class RoundTripReport:
    """Counts and the worst landmark error of a label round trip over one folder."""

    inputs: int
    checked: int
    failed: dict[str, str]  # file -> reason
    max_error_px: float
    mean_error_px: float
    max_pt3d_error_px: float | None  # AFLW2000-3D: label landmarks against the stored pt3d_68

    def as_dict(self) -> dict:
        return {
            "inputs": self.inputs, "checked": self.checked, "failed": self.failed,
            "max_error_px": self.max_error_px, "mean_error_px": self.mean_error_px,
            "max_pt3d_error_px": self.max_pt3d_error_px,
        }


def label_round_trip(
    model: MorphableModel, layout: str, root: str, crops: list | None = None, max_crops: int = 0
) -> RoundTripReport:
    """Label every sample of a folder and map its landmarks back; see the module docstring.

    ``crops``, when given, receives up to ``max_crops`` (crop image, crop landmarks) pairs.
    """
    lister = {"300w-lp": list_300w_lp, "aflw2000-3d": list_aflw2000}.get(layout)
    if lister is None:
        raise ValueError(f"layout must be '300w-lp' or 'aflw2000-3d', got {layout!r}")
    filesystem, refs = lister(root)
    errors, pt3d_errors, failed = [], [], {}
    for ref in refs:
        try:
            annotation = read_annotation(filesystem, ref)
            image = read_image(filesystem, ref)
        except DatasetError as err:
            failed[err.path] = err.reason
            continue
        truth = image_landmarks(model, annotation, image.shape[0])
        box = landmark_crop_box(truth)
        label = label_from_annotation(annotation, box, image.shape[0])
        back = landmarks_in_image(model, label, box)
        errors.append(np.abs(back[:2] - truth[:2]).max())
        if annotation.pt3d_68 is not None:
            pt3d_errors.append(np.abs(back[:2] - annotation.pt3d_68[:2]).max())
        if crops is not None and len(crops) < max_crops:
            crops.append((crop_image(image, box), crop_landmarks(model, label)))
    return RoundTripReport(
        inputs=len(refs), checked=len(errors), failed=failed,
        max_error_px=float(max(errors, default=np.nan)),
        mean_error_px=float(np.mean(errors)) if errors else float("nan"),
        max_pt3d_error_px=float(max(pt3d_errors)) if pt3d_errors else None,
    )
