"""Reading a file of network weights, whatever wrapper the trainer that wrote it used."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

# Keys under which trainers nest the state dict (3DDFA_V2 writes "state_dict").
WRAPPER_KEYS = ("state_dict", "model")


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` that ``nn.DataParallel`` puts before every key."""
    prefix = "module."
    return {key.removeprefix(prefix): value for key, value in state_dict.items()}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from ``path``: a state dict, or one under ``state_dict`` / ``model``.

    Read with ``weights_only=True`` (no pickled code); ``module.`` prefixes are dropped.
    Raises ValueError naming the file when it is unreadable or holds no state dict.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # A file that is not a torch archive fails inside the unpickler with any of these.
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: cannot read as a torch checkpoint ({type(err).__name__})") from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    for key in WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    if not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or one under 'state_dict' / 'model')")
    return strip_module_prefix(checkpoint)
