"""Networks by name, their complexity, and weights from a file.

Complexity convention: ``macs`` counts multiply-accumulates of the convolutions and matrix
products (what ``torch.utils.flop_counter`` sees; BN, activations, pooling and the elementwise
products of SE/SGE are not counted), ``flops = 2 * macs``.

Which convention the papers use: Mobile-FRNet's MobileNetV2 "0.109 GFLOPs" is a count of
multiply-adds, each counted once (the usual "FLOPs" of mobile papers): the same network here has
93.2 M MACs (the paper's figure is 17 % above it; the 2-per-MAC count, 186.4 M, is 71 % above
the paper's). The remaining 15.9 M is most likely the profiler charging the elementwise layers
too (1.98 M BatchNorm and 1.81 M ReLU6 outputs at 4 ops each would be 15.2 M); the paper names
no tool. 3DDFA_V2's MobileNetV1 "183.5 M MACs" is reproduced by conv/matmul MACs (177.4 M)
plus 4 ops per BatchNorm output (1.50 M elements): 183.4 M.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.frame import CROP_SIZE
from models.mobile_frnet import mobile_frnet, mobile_frnet_no_attention, mobilenet_v2
from models.mobilenet_v1 import MobileNetV1, load_3ddfa_v2_checkpoint
from models.params import NUM_PARAMS
from models.weights import read_state_dict

# name -> builder(num_params, width)
ARCHITECTURES: dict[str, Callable[[int, float], nn.Module]] = {
    "mobile-frnet": mobile_frnet,
    "mobile-frnet-noatt": mobile_frnet_no_attention,
    "mobilenet-v2": mobilenet_v2,
    "mobilenet-v1": lambda num_params, width: MobileNetV1(width, num_params),
}


def build_model(name: str, width: float = 1.0, num_params: int = NUM_PARAMS) -> nn.Module:
    """A freshly initialised network: input (B, 3, 120, 120), output (B, num_params)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return ARCHITECTURES[name](num_params, width)


def count_complexity(model: nn.Module, input_size: int = CROP_SIZE) -> dict[str, int]:
    """Parameters, MACs and FLOPs (= 2 MACs) of one forward pass of a 1x3xSxS input.

    Runs the model once in eval mode under ``torch.no_grad`` and restores its mode.
    """
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    params = sum(p.numel() for p in model.parameters())
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        model.train(was_training)
    flops = counter.get_total_flops()
    return {"params": params, "macs": flops // 2, "flops": flops}


def load_model(name: str, width: float = 1.0, checkpoint_path: Path | None = None,
               num_params: int = NUM_PARAMS) -> nn.Module:
    """``build_model`` plus weights from ``checkpoint_path`` (strict), in eval mode.

    For ``mobilenet-v1`` the file may be a 3DDFA_V2 checkpoint (see
    :func:`models.mobilenet_v1.load_3ddfa_v2_checkpoint`); ``num_params`` then follows the file.
    """
    if checkpoint_path is None:
        return build_model(name, width, num_params).eval()
    if name == "mobilenet-v1":
        return load_3ddfa_v2_checkpoint(checkpoint_path, width)
    model = build_model(name, width, num_params)
    state = read_state_dict(checkpoint_path)
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise ValueError(f"{checkpoint_path}: does not fit {name} (width {width}): {mismatch}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def state_dict_mismatch(wanted: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """One line on how ``given`` differs from a network's ``wanted`` weights; empty if it fits."""
    missing = [key for key in wanted if key not in given]
    unexpected = [key for key in given if key not in wanted]
    shapes = [key for key in wanted if key in given and given[key].shape != wanted[key].shape]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if keys:
            first = keys[0]
            detail = (f" ({tuple(given[first].shape)} for {tuple(wanted[first].shape)})"
                      if what == "of another shape" else "")
            parts.append(f"{len(keys)} weights {what}, first {first}{detail}")
    return "; ".join(parts)
