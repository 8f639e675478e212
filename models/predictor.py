"""One predictor from an image to landmarks, dense vertices and head pose.

    crop (box, landmarks or detector box) -> network -> de-whiten -> 68 landmarks, vertices and
    pose angles, mapped back to the original image

Input and output follow :mod:`models.frame`: the 120x120 BGR crop normalised as 3DDFA's
published checkpoints expect; 1-based pixel coordinates of the original image, y down; z scaled
like x and y.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.frame import (
    crop_image,
    crops_to_tensor,
    detector_crop_box,
    landmark_crop_box,
    param_frame_to_image,
)
from models.morphable import MorphableModel
from models.params import ParamStats, pose_angles


@dataclass(frozen=True)
class Prediction:
    """What the predictor gives for one face.

    Attributes:
        params: (62,) de-whitened parameter in the crop's frame.
        box: (4,) the crop box in the image.
        landmarks: (3, 68) in image coordinates.
        vertices: (3, N) every model vertex in image coordinates (N = 68 for a keypoint model).
        pose: (3,) pitch, yaw, roll in radians (300W-LP's convention).
    """

    params: np.ndarray
    box: np.ndarray
    landmarks: np.ndarray
    vertices: np.ndarray
    pose: np.ndarray


class FacePredictor:
    """A network, its whitening statistics and its morphable model, put together for inference."""

    def __init__(self, network: nn.Module, stats: ParamStats, model: MorphableModel,
                 device: torch.device | str = "cpu") -> None:
        self.network = network.to(device).eval()
        self.stats = stats
        self.model = model
        self.device = torch.device(device)

    @torch.no_grad()
    def predict_params(self, crops: np.ndarray) -> np.ndarray:
        """De-whitened parameters (B, 62) float64 of BGR uint8 crops (B, 120, 120, 3)."""
        whitened = self.network(crops_to_tensor(crops, self.device)).float().cpu().numpy()
        return self.stats.dewhiten(whitened.astype(np.float64))

    def predict(
        self,
        image: np.ndarray,
        box: np.ndarray | None = None,
        landmarks: np.ndarray | None = None,
        detection: np.ndarray | None = None,
    ) -> Prediction:
        """Predict one face of ``image`` (H, W, 3) BGR uint8, cropped by exactly one of: a crop
        ``box`` (sx, sy, ex, ey), 2D ``landmarks`` (2+, K) (the benchmark rule), or a face
        detector's ``detection`` (x1, y1, x2, y2) (3DDFA_V2's rule)."""
        given = [v is not None for v in (box, landmarks, detection)]
        if sum(given) != 1:
            raise ValueError("give exactly one of box, landmarks or detection")
        if landmarks is not None:
            box = landmark_crop_box(landmarks)
        elif detection is not None:
            box = detector_crop_box(np.asarray(detection, dtype=np.float64))
        box = np.asarray(box, dtype=np.float64)
        params = self.predict_params(crop_image(image, box)[None])[0]
        vertices = param_frame_to_image(self.model.vertices(params), box)
        return Prediction(
            params=params, box=box, landmarks=vertices[:, self.model.landmark_indices],
            vertices=vertices, pose=pose_angles(params),
        )


class MeanFacePredictor(FacePredictor):
    """Predicts the whitening mean (the mean face in the mean pose) for every crop, ignoring the
    pixels: the baseline a trained model has to beat on the same faces and crops."""

    def predict_params(self, crops: np.ndarray) -> np.ndarray:
        return np.repeat(self.stats.mean[None, :].astype(np.float64), len(crops), axis=0)
