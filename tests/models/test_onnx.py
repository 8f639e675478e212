import numpy as np
import onnx
import pytest
import scipy.io
import torch
from torch import nn

from models.architectures import build_model
from models.frame import crop_image, crops_to_tensor, landmark_crop_box
from models.inference_form import inference_form
from models.mobile_frnet import SpatialGroupEnhance
from models.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx
from tests.conftest import real_face_image, shared_path

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


# Li et al., ICPR 2020: Mobile-FRNet has 2.60 M parameters.
PAPER_PARAMS = 2.60e6
PARITY_TOLERANCE = 1e-4  # max abs difference of the 62 outputs, ONNX Runtime against torch


def trained_like_mobile_frnet() -> nn.Module:
    """Mobile-FRNet with calibrated batch norms and SGE gamma/beta away from their start values.

    At initialisation SGE's gamma is 0, which makes every SGE a constant gate and would leave
    its similarity and normalisation out of the comparison. Spreads of 0.25 keep the network's
    float32 rounding (about 1e-5 at this scale) well under the tolerance.
    """
    model = calibrated("mobile-frnet")
    generator = torch.Generator().manual_seed(7)
    for module in model.modules():
        if isinstance(module, SpatialGroupEnhance):
            module.gamma.data = 0.25 * torch.randn(module.gamma.shape, generator=generator)
            module.beta.data = 1 + 0.25 * torch.randn(module.beta.shape, generator=generator)
    return model


def real_face_crop() -> torch.Tensor:
    """The real AFLW2000-3D face (image00427) cropped by the benchmark ROI rule: (1, 3, 120, 120)."""
    landmarks = scipy.io.loadmat(str(shared_path("aflw2000-3d", "mat", "image00427.mat")))["pt3d_68"]
    crop = crop_image(real_face_image(), landmark_crop_box(landmarks[:2]))
    return crops_to_tensor(crop[None])


@pytest.fixture(scope="module")
def inference_export(tmp_path_factory):
    model = trained_like_mobile_frnet()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "mobile-frnet.onnx")
    return model, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path


def test_the_inference_form_export_equals_the_trained_network_on_32_random_inputs(inference_export):
    model, session, _ = inference_export
    images = torch.randn(32, 3, 120, 120, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = model(images).numpy()
    (actual,) = session.run(None, {INPUT_NAME: images.numpy()})
    assert np.abs(expected).max() > 0.1  # outputs of a real size, not bias alone
    assert np.abs(actual - expected).max() < PARITY_TOLERANCE
    assert not model.training


def test_the_inference_form_export_equals_the_trained_network_on_the_real_face(inference_export):
    model, session, _ = inference_export
    crop = real_face_crop()
    with torch.no_grad():
        expected = model(crop).numpy()
    (actual,) = session.run(None, {INPUT_NAME: crop.numpy()})
    assert np.abs(actual - expected).max() < PARITY_TOLERANCE


def test_the_inference_form_keeps_the_weights_and_drops_the_concatenations(inference_export):
    """The summed projections hold the same weights (BN folded) and leave no Concat to copy."""
    model, _, path = inference_export
    graph = onnx.load(str(path)).graph
    exported_weights = sum(int(np.prod(tensor.dims)) for tensor in graph.initializer
                           if tensor.data_type == onnx.TensorProto.FLOAT)
    trained = sum(p.numel() for p in model.parameters())
    assert abs(trained - PAPER_PARAMS) / PAPER_PARAMS < 0.05
    assert abs(exported_weights - PAPER_PARAMS) / PAPER_PARAMS < 0.05
    assert "Concat" not in {node.op_type for node in graph.node}
    plain = export_onnx(model, path.with_name("as-trained.onnx"), inference=False)
    assert "Concat" in {node.op_type for node in onnx.load(str(plain)).graph.node}


def test_the_inference_form_leaves_the_trained_model_untouched():
    model = trained_like_mobile_frnet().train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    form = inference_form(model)
    assert model.training and not form.training
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert not any(p.requires_grad for p in form.parameters())
