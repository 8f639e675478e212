"""A registered model as MLflow's pyfunc flavour loads it, anywhere: crops in, landmarks out.

    model = mlflow.pyfunc.load_model("models:/mobile-frnet@champion")
    out = model.predict(crops)   # (N, S, S, 3) uint8 BGR face crops (the project's crop rule)
    out["landmarks"]             # (N, 68, 2) crop pixels, 1-based, y down (of the S-pixel crop)
    out["pose"]                  # (N, 3) yaw, pitch, roll in degrees
    out["params"]                # (N, 62) the de-whitened 3DMM parameter (of the 120-pixel crop)

The model folder MLflow keeps holds plain data only: ``model.pt`` (the project's model file:
weights as a state dict, architecture, whitening statistics; ``torch.load(weights_only=True)``),
``NAME.npz`` (the morphable model's arrays; ``allow_pickle=False``) and ``served.json``. The code
beside it is this module and what it imports, torch, numpy and OpenCV only, so loading needs
neither this project nor anything pickled. A crop of another square size is resized to 120x120
(bilinear) first, and its landmarks are given in its own pixels.

The input contract, the same in-process and over ``mlflow models serve`` (whose JSON body
reaches ``predict`` as the array numpy makes of it: the model's signature declares its outputs
only, so the server casts nothing): whole-number pixel values 0..255, as uint8 or any integer
dtype (a float or bool array is refused, its dtype named, so NaN never reaches the network);
square crops of at least :data:`MIN_CROP_SIDE` pixels; at most :data:`MAX_BATCH` crops a call;
an empty batch gives empty outputs. A refusal is a ValueError whose message names the reason;
through pyfunc it is MLflow's invalid-input error with that message, which its server answers
with 400 and no stack trace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from models.architectures import build_model
from models.frame import CROP_SIZE, crops_to_tensor, param_frame_to_crop
from models.morphable import MorphableModel
from models.params import ParamStats, pose_angles

MODEL_FILE = "model.pt"
META_FILE = "served.json"
FORMAT = "mobile-frnet-served/1"
# What the model folder's code needs (module names in the models package); nothing else ships.
MODULES = ("frame", "params", "morphable", "architectures", "mobile_frnet", "mobilenet_v1", "weights",
           "served")
OUTPUTS = ("landmarks", "pose", "params")
# The smallest crop side scored: below it a face has too few pixels for 68 points (the network
# sees 120x120; a 32-pixel crop is already enlarged almost 4 times).
MIN_CROP_SIDE = 32
# The most crops one call takes: 64 crops of 120x120 are 2.8 MB as uint8, about 10 MB as JSON.
MAX_BATCH = 64


def write_model_folder(folder: Path, model_file_data: dict[str, Any], face_model: MorphableModel) -> None:
    """The data MLflow keeps beside the code: the model file's dict (as ``save_bundle`` writes
    it), the morphable model's arrays and the description that ties them together."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if face_model.identity != model_file_data["morphable_identity"]:
        raise ValueError(f"morphable model {face_model.identity} is not the one the network was trained "
                         f"with ({model_file_data['morphable_identity']})")
    torch.save(model_file_data, folder / MODEL_FILE)
    arrays = f"{face_model.name}.npz"
    face_model.save_npz(folder / arrays)
    meta = {"format": FORMAT, "model_file": MODEL_FILE, "morphable_arrays": arrays,
            "morphable_identity": face_model.identity, "crop_size": CROP_SIZE,
            "outputs": {"landmarks": "(N, 68, 2) crop pixels, 1-based, y down",
                        "pose": "(N, 3) yaw, pitch, roll in degrees", "params": "(N, 62) de-whitened"}}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


class ServedModel:
    """The network, its whitening statistics and its morphable model; ``predict`` as pyfunc calls it."""

    def __init__(self, network: torch.nn.Module, stats: ParamStats, face_model: MorphableModel) -> None:
        self.network = network.eval()
        self.stats = stats
        self.face_model = face_model

    @torch.no_grad()
    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        crops = as_crops(model_input)
        if len(crops) == 0:
            return {"landmarks": np.zeros((0, 68, 2)), "pose": np.zeros((0, 3)), "params": np.zeros((0, 62))}
        size = crops.shape[1]
        if size != CROP_SIZE:
            crops = np.stack([cv2.resize(crop, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LINEAR)
                              for crop in crops])
        whitened = self.network(crops_to_tensor(crops)).float().numpy().astype(np.float64)
        parameters = self.stats.dewhiten(whitened)
        points = param_frame_to_crop(self.face_model.landmarks(parameters))[:, :2]  # (N, 2, 68)
        # The crop rule scales about the 1-based frame's origin (x_c = s (x - sx)): an S-pixel
        # crop of the same box has its points at S / 120 times the 120-pixel crop's.
        landmarks = points.transpose(0, 2, 1) * (size / CROP_SIZE)
        pitch_yaw_roll = pose_angles(parameters)
        pose = np.degrees(pitch_yaw_roll[:, [1, 0, 2]])
        return {"landmarks": landmarks, "pose": pose, "params": parameters}


def as_crops(model_input: Any) -> np.ndarray:
    """(N, S, S, 3) uint8 from what pyfunc passes, by the module's input contract; a
    ValueError names what is wrong."""
    crops = np.asarray(model_input)
    if crops.ndim == 1 and crops.size == 0:  # `{"inputs": []}`: no crops
        return np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    if crops.ndim == 3:
        crops = crops[None]
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.shape[1] != crops.shape[2]:
        raise ValueError(f"expected BGR face crops of shape (N, S, S, 3), got {crops.shape}")
    if len(crops) > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} crops a call, got {len(crops)}: split the batch")
    if crops.shape[1] < MIN_CROP_SIDE:
        raise ValueError(f"crops of at least {MIN_CROP_SIDE}x{MIN_CROP_SIDE} pixels, got "
                         f"{crops.shape[1]}x{crops.shape[2]}")
    if crops.dtype != np.uint8:
        if crops.dtype == np.bool_ or not np.issubdtype(crops.dtype, np.integer):
            raise ValueError(f"expected whole-number pixel values 0..255 (uint8), got dtype {crops.dtype}")
        if crops.size and (crops.min() < 0 or crops.max() > 255):
            raise ValueError(f"expected pixel values 0..255 (uint8), got {crops.min()}..{crops.max()}")
        crops = crops.astype(np.uint8)
    return np.ascontiguousarray(crops)


def load_model_folder(folder: Path) -> ServedModel:
    """The model in a folder :func:`write_model_folder` wrote (nothing in it is unpickled)."""
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / META_FILE}: not a {FORMAT} model (format {meta.get('format')!r})")
    data = torch.load(folder / meta["model_file"], map_location="cpu", weights_only=True)
    face_model = MorphableModel.from_3ddfa_arrays(folder / meta["morphable_arrays"])
    if face_model.identity != meta["morphable_identity"] or face_model.identity != data["morphable_identity"]:
        raise ValueError(f"{folder}: the morphable arrays are {face_model.identity}, but the network was "
                         f"trained with {data['morphable_identity']}")
    network = build_model(data["arch"], float(data["width"]))
    network.load_state_dict(data["state_dict"], strict=True)
    stats = ParamStats(data["param_mean"].double().numpy(), data["param_std"].double().numpy())
    return ServedModel(network, stats, face_model)


class PyfuncModel:
    """What MLflow's pyfunc calls: :class:`ServedModel`'s predict, with a refused input raised as
    MLflow's invalid-input error (its server answers 400 with the message; any other exception
    becomes its generic 400 with a stack trace that names the server's paths)."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        try:
            return self.model.predict(model_input, params)
        except ValueError as err:
            from mlflow.exceptions import MlflowException  # present wherever pyfunc loads this
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from err


def _load_pyfunc(path: str) -> PyfuncModel:
    """MLflow's entry point for ``loader_module="models.served"``: ``path`` is the data folder."""
    return PyfuncModel(load_model_folder(Path(path)))
