import numpy as np
import onnx
import pytest
import torch
from torch import nn

from models.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx
from models.registry import build_model

ort = pytest.importorskip("onnxruntime")


def calibrated(name: str) -> nn.Module:
    """A fresh network whose BatchNorm statistics come from one random batch.

    Freshly initialised statistics (mean 0, var 1) shrink the activations layer after layer
    until the output is the head's bias alone, which would make the comparison trivial.
    """
    model = build_model(name)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 120, 120, generator=torch.Generator().manual_seed(0)))
    return model.eval()


@pytest.mark.parametrize("name", ["mobile-frnet", "mobile-frnet-noatt", "mobilenet-v1"])
def test_onnxruntime_matches_torch_at_batch_1_and_8(name, tmp_path):
    model = calibrated(name)
    path = export_onnx(model, tmp_path / f"{name}.onnx", opset=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME]
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 8):
        image = torch.randn(batch, 3, 120, 120, generator=generator)
        with torch.no_grad():
            expected = model(image).numpy()
        (actual,) = session.run(None, {INPUT_NAME: image.numpy()})
        assert actual.shape == (batch, 62)
        assert np.abs(expected).max() > 1e-2  # a real comparison, not bias against bias
        assert np.abs(actual - expected).max() <= 1e-4
    assert not model.training


def test_mobile_frnet_exports_without_shape_or_split_nodes(tmp_path):
    """The multi-scale split and SGE's grouping are convs, gathers and 4-D elementwise ops.

    Split/Slice/Reshape (and the Shape arithmetic of a dynamic batch) run outside
    onnxruntime's blocked NCHWc layout and cost a layout conversion each at batch 1.
    """
    path = export_onnx(build_model("mobile-frnet"), tmp_path / "mobile-frnet.onnx")
    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not op_types & {"Split", "Slice", "Shape", "Reshape", "Unsqueeze", "Expand", "Transpose"}
