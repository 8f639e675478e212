"""`frnet info` and `frnet export` called in-process (their main functions)."""

import json

import numpy as np
import pytest
import torch

from models.registry import build_model
from pipeline import export, info
from tests.conftest import shared_path


def test_info_prints_and_writes_the_figures(tmp_path, capsys):
    assert info.main(["--arch", "mobilenet-v1", "--width", "0.5", "--json",
                      str(tmp_path / "info.json")]) == 0
    figures = json.loads((tmp_path / "info.json").read_text())
    assert set(figures) == {"arch", "width", "params", "macs", "flops"}
    assert figures["arch"] == "mobilenet-v1" and figures["width"] == 0.5
    assert figures["flops"] == 2 * figures["macs"] > 0
    assert json.loads(capsys.readouterr().out) == figures


def test_export_loads_a_plain_state_dict_and_writes_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = build_model("mobilenet-v2").eval()
    torch.save({"model": model.state_dict()}, tmp_path / "weights.pt")
    assert export.main(["--arch", "mobilenet-v2", "--checkpoint", str(tmp_path / "weights.pt"),
                        "--onnx", str(tmp_path / "m.onnx"),
                        "--json", str(tmp_path / "export.json")]) == 0
    figures = json.loads((tmp_path / "export.json").read_text())
    assert figures["onnx_bytes"] == (tmp_path / "m.onnx").stat().st_size
    image = np.zeros((2, 3, 120, 120), dtype=np.float32)
    (params,) = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": image})
    with torch.no_grad():
        np.testing.assert_allclose(params, model(torch.from_numpy(image)).numpy(), atol=1e-4)


def test_export_refuses_weights_of_another_network(tmp_path):
    checkpoint = shared_path("peers", "3ddfa_v2_mb05_120x120.pth")
    assert export.main(["--arch", "mobilenet-v1", "--width", "1.0", "--checkpoint",
                        str(checkpoint), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert export.main(["--arch", "mobile-frnet", "--checkpoint", str(checkpoint),
                        "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert not (tmp_path / "m.onnx").exists()
