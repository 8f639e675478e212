"""Export a regressor to ONNX with a dynamic batch axis (torch and onnx only).

The graph has one input ``image`` (B, 3, S, S) and one output ``params`` (B, num_params); the
batch size B is free, the image size is fixed by the example input. What is exported is the
model's inference form (:mod:`models.inference_form`): the same function in a graph that ONNX
Runtime runs faster; ``inference=False`` exports the modules as they were trained. torch's
TorchScript-based exporter is used: the newer ``torch.export`` path needs the ``onnxscript``
package, which this project does not depend on.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from models.frame import CROP_SIZE
from models.inference_form import inference_form

INPUT_NAME = "image"
OUTPUT_NAME = "params"
BATCH_AXIS = "batch"


def export_onnx(model: nn.Module, path: Path, opset: int = 17, input_size: int = CROP_SIZE,
                inference: bool = True) -> Path:
    """Write ``model`` (in eval mode; its inference form unless ``inference`` is False) to
    ``path`` and check the file; returns the path.

    ``model`` itself is left as it was, training mode included.
    """
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    example = torch.zeros(2, 3, input_size, input_size, device=device)
    was_training = model.training
    model.eval()
    exported = inference_form(model) if inference else model
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter announces its deprecation on every call; it is chosen
            # on purpose (see the module docstring), so the notice is noise here.
            warnings.simplefilter("ignore", DeprecationWarning)
            # SGE's instance norm always normalises with the input's statistics, in eval mode
            # too (ONNX InstanceNormalization does the same), which the exporter warns about.
            warnings.filterwarnings("ignore", message=".*'instance_norm' is set to train=True")
            # ...and F.instance_norm's check that a map has more than one position is traced
            # as a constant; the exported image size is fixed, so that is what it should be.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                    module="torch.nn.functional")
            torch.onnx.export(
                exported, (example,), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
                do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    onnx.checker.check_model(onnx.load(str(path)))
    return path
