"""Self-contained model files: weights plus everything needed to predict with them.

A file holds the architecture and width, the weights, the whitening statistics, the morphable
model's source and identity, and the coordinate convention, as plain tensors, numbers and
strings (``torch.load(weights_only=True)`` reads it; nothing is unpickled). Training
checkpoints add the optimiser and scheduler state, the epoch and the config under ``training``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.architectures import build_model
from models.face_models import load_face_model
from models.frame import COORDINATES
from models.params import ParamStats
from models.predictor import FacePredictor

FORMAT = "mobile-frnet/1"
REQUIRED_KEYS = ("arch", "width", "state_dict", "param_mean", "param_std", "morphable_source",
                 "morphable_identity")


@dataclass(frozen=True)
class ModelBundle:
    """A network's weights and what it needs around them."""

    arch: str
    width: float
    state_dict: dict[str, torch.Tensor]
    param_stats: ParamStats
    morphable_source: str
    morphable_identity: str
    config: dict[str, Any] = field(default_factory=dict)
    coordinates: str = COORDINATES

    def build_network(self) -> nn.Module:
        network = build_model(self.arch, self.width)
        network.load_state_dict(self.state_dict, strict=True)
        return network.eval()

    def predictor(self, device: torch.device | str = "cpu") -> FacePredictor:
        """A :class:`FacePredictor`; the morphable model is loaded and its identity checked."""
        model = load_face_model(self.morphable_source)
        if model.identity != self.morphable_identity:
            raise ValueError(
                f"morphable model {self.morphable_source!r} is {model.identity}, but the network was "
                f"trained with {self.morphable_identity}: labels and landmarks would not match"
            )
        return FacePredictor(self.build_network(), self.param_stats, model, device)


def bundle_to_dict(bundle: ModelBundle) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "arch": bundle.arch,
        "width": float(bundle.width),
        "state_dict": {k: v.detach().cpu() for k, v in bundle.state_dict.items()},
        "param_mean": torch.tensor(bundle.param_stats.mean),
        "param_std": torch.tensor(bundle.param_stats.std),
        "morphable_source": bundle.morphable_source,
        "morphable_identity": bundle.morphable_identity,
        "coordinates": bundle.coordinates,
        "config": bundle.config,
    }


def bundle_from_dict(data: dict[str, Any], source: str = "checkpoint") -> ModelBundle:
    if data.get("format") != FORMAT:
        raise ValueError(f"{source}: not a {FORMAT} model file (format {data.get('format')!r})")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"{source}: model file lacks {', '.join(missing)}")
    return ModelBundle(
        arch=data["arch"], width=float(data["width"]), state_dict=data["state_dict"],
        param_stats=ParamStats(data["param_mean"].double().numpy(), data["param_std"].double().numpy()),
        morphable_source=data["morphable_source"], morphable_identity=data["morphable_identity"],
        config=data.get("config", {}), coordinates=data.get("coordinates", COORDINATES),
    )


def save_bundle(path: Path, bundle: ModelBundle, training: dict[str, Any] | None = None) -> None:
    """Write a model file (with an optional ``training`` section for resuming)."""
    data = bundle_to_dict(bundle)
    if training is not None:
        data["training"] = training
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    torch.save(data, temporary)
    temporary.replace(path)


def load_bundle(path: Path) -> tuple[ModelBundle, dict[str, Any] | None]:
    """Read a model file: the bundle and its ``training`` section (None if absent)."""
    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    # A file that is not a torch archive fails inside the unpickler with any of these.
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as err:
        reason = f"not a readable torch file: {type(err).__name__}"
        raise ValueError(f"{path}: not a model file ({reason})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a model file (holds a {type(data).__name__}, not a dict)")
    return bundle_from_dict(data, str(path)), data.get("training")


def recorded_arch(path: Path) -> tuple[str, float] | None:
    """The (arch, width) a project model file records; None for any other weights file (a bare
    state dict, a 3DDFA_V2 checkpoint), which does not say what network it is for."""
    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: not a readable torch file ({type(err).__name__})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return str(data["arch"]), float(data["width"])
