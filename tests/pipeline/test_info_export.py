"""`frnet info` and `frnet export` called in-process (their main functions)."""

import json

import numpy as np
import pytest
import torch

from models.architectures import build_model
from models.checkpoint import ModelBundle, save_bundle
from models.params import ParamStats
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


def test_export_refuses_weights_of_another_network(tmp_path, caplog):
    """Weights that do not fit the network named are refused (exit 2) in one line, not a listing
    of every key."""
    checkpoint = shared_path("peers", "3ddfa_v2_mb05_120x120.pth")
    assert export.main(["--arch", "mobilenet-v1", "--width", "1.0", "--checkpoint",
                        str(checkpoint), "--onnx", str(tmp_path / "m.onnx")]) == 2
    caplog.clear()
    assert export.main(["--arch", "mobile-frnet", "--checkpoint", str(checkpoint),
                        "--onnx", str(tmp_path / "m.onnx")]) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "does not fit mobile-frnet (width 1.0): " in message and "weights missing, first " in message
    assert len(message) < 400 and "\n" not in message
    assert not (tmp_path / "m.onnx").exists()


def small_model_file(path, width=0.5):
    """A project model file of an untrained Mobile-FRNet at ``width``."""
    bundle = ModelBundle(arch="mobile-frnet", width=width,
                         state_dict=build_model("mobile-frnet", width).state_dict(),
                         param_stats=ParamStats(np.zeros(62), np.ones(62)), morphable_source="synthetic",
                         morphable_identity="-")
    save_bundle(path, bundle)
    return path


def test_export_reads_network_and_width_from_the_model_file(tmp_path, caplog):
    """A model file says what it holds: no --arch/--width needed, flags that repeat it are fine,
    flags that contradict it are refused (exit 2) with the recorded values named."""
    model = small_model_file(tmp_path / "half.pt")
    assert export.main(["--checkpoint", str(model), "--onnx", str(tmp_path / "a.onnx"),
                        "--json", str(tmp_path / "a.json")]) == 0
    figures = json.loads((tmp_path / "a.json").read_text())
    assert (figures["arch"], figures["width"]) == ("mobile-frnet", 0.5)
    assert figures["params"] == sum(p.numel() for p in build_model("mobile-frnet", 0.5).parameters())
    assert export.main(["--checkpoint", str(model), "--arch", "mobile-frnet", "--width", "0.5",
                        "--onnx", str(tmp_path / "b.onnx")]) == 0
    caplog.clear()
    assert export.main(["--checkpoint", str(model), "--arch", "mobile-frnet",
                        "--width", "1.0", "--onnx", str(tmp_path / "c.onnx")]) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert message.startswith("--width 1.0 disagrees with ") and "records mobile-frnet width 0.5" in message
    assert not (tmp_path / "c.onnx").exists()


def test_export_needs_arch_for_weights_that_do_not_name_it(tmp_path, caplog):
    torch.save(build_model("mobilenet-v2").state_dict(), tmp_path / "bare.pt")
    assert export.main(["--checkpoint", str(tmp_path / "bare.pt"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert export.main(["--checkpoint", str(tmp_path / "none.pt"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors[0].startswith("--arch is needed: ") and "records no network" in errors[0]
    assert errors[1].startswith("--checkpoint ") and "none.pt: not found" in errors[1]
    assert not (tmp_path / "m.onnx").exists()


def test_export_writes_the_inference_form_unless_asked_for_the_modules_as_trained(tmp_path):
    """Only the inference form drops the concatenations (tests/models/test_onnx.py holds its
    outputs to the trained network's), and the figures say which form was written."""
    import onnx

    model = small_model_file(tmp_path / "model.pt", width=1.0)
    for name, flags in (("inference", []), ("as-trained", ["--as-trained"])):
        path = tmp_path / f"{name}.onnx"
        assert export.main(["--checkpoint", str(model), "--onnx", str(path), *flags,
                            "--json", str(tmp_path / f"{name}.json")]) == 0
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert ("Concat" in ops) == (name == "as-trained")
        figures = json.loads((tmp_path / f"{name}.json").read_text())
        assert figures["inference_form"] == (name == "inference")
