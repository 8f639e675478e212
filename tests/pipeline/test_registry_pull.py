"""A registered model pulled where this project is not installed: 3DDFA_V2's released
MobileNetV1-0.5 checkpoint is registered with `frnet register` through the evaluation gate, then
loaded by alias with plain `mlflow.pyfunc.load_model` in a Python that cannot import this
project, and served with `mlflow models serve`. Both answer the real AFLW2000-3D face image00427
as `frnet predict` does, and as the reference figure of its crop says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
import torch

from models.architectures import build_model
from models.checkpoint import ModelBundle, save_bundle
from models.frame import crop_image, crop_to_image, nme
from models.params import ParamStats
from pipeline.runtime.tracking import CHAMPION, RANKING_TAG, bundle_from_model_uri, open_store
from tests.conftest import REPO_ROOT, real_face_image, shared_path
from tests.pipeline.cluster_harness import FOREIGN_ENV, VENV_BIN, Deadline, free_ports, wait_for_url
from tests.pipeline.pull_harness import PULL, clean_python

pytestmark = pytest.mark.cluster

NAME = "frnet-peer"
FACE = "image00427"
FACE_INDEX = 255  # its row in the AFLW2000-3D protocol arrays (sorted-file order)
SERVER_UP_S = 120
def peer_args(shared: Path, run_dir: Path, aflw2000: Path) -> list[str]:
    stats = ",".join(str(shared / "bfm68" / f"param_{kind}_v2.txt") for kind in ("mean", "std"))
    return ["register", "--checkpoint", str(shared / "peers" / "3ddfa_v2_mb05_120x120.pth"),
            "--arch", "mobilenet-v1", "--width", "0.5", "--morphable", f"bfm68:{shared / 'bfm68'}",
            "--param-stats", stats,
            "--run-dir", str(run_dir), "--name", NAME, "--aflw2000", str(aflw2000)]


def frnet(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in FOREIGN_ENV}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *arguments], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> dict:
    """The peer registered through the gate, scored on a one-face AFLW2000-3D folder."""
    shared = shared_path("peers").parent
    root = tmp_path_factory.mktemp("registry")
    aflw2000 = root / "AFLW2000"
    aflw2000.mkdir()
    cv2.imwrite(str(aflw2000 / f"{FACE}.jpg"), real_face_image(), [cv2.IMWRITE_JPEG_QUALITY, 95])
    shutil.copy(shared / "aflw2000-3d" / "mat" / f"{FACE}.mat", aflw2000)
    result = frnet([*peer_args(shared, root / "run", aflw2000), "--json", str(root / "register.json")], root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((root / "register.json").read_text())
    return {"root": root, "shared": shared, "aflw2000": aflw2000, "figures": figures,
            "store": f"sqlite:///{root / 'run' / 'mlflow.db'}"}


def test_register_through_the_gate(registered):
    figures, client = registered["figures"], mlflow.MlflowClient(registered["store"])
    assert figures["model_version"] == "1" and figures["champion"]
    version = client.get_model_version_by_alias(NAME, CHAMPION)
    assert str(version.version) == "1" and version.run_id == figures["run_id"]
    # frnet evaluate on the full image measures 2.71% for this face (the reference data's note).
    assert float(version.tags[RANKING_TAG]) == pytest.approx(0.0271, abs=0.0005)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registered["store"])
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=figures["model_uri"]))
    finally:
        mlflow.set_tracking_uri(previous)
    files = {path.name for path in folder.rglob("*")}
    assert {"served.json", "model.pt", "bfm68.npz", "MLmodel", "requirements.txt", "served.py"} <= files
    assert not [name for name in files if name.endswith((".pkl", ".pickle"))]
    requirements = (folder / "requirements.txt").read_text().split()
    assert "mobile-frnet" not in " ".join(requirements)
    assert {line.split("==")[0] for line in requirements} >= {"torch", "numpy"}
    # OpenCV as a range, so a consumer's other OpenCV release loads without a mismatch warning.
    assert "opencv-python-headless<5,>=4.9" in requirements
    # Registered again without a score: version 2, and the champion stays version 1.
    shared, root = registered["shared"], registered["root"]
    again = frnet(peer_args(shared, root / "run", registered["aflw2000"])[:-2], root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "version 2: registered unscored; the champion stays" in again.stdout
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == "1"


def test_pull_in_a_clean_environment_and_serve(registered, processes, tmp_path):
    keeper, _ = processes
    root, shared, store = registered["root"], registered["shared"], registered["store"]
    model_uri = f"models:/{NAME}@{CHAMPION}"

    # frnet predict on the whole image, from a detector-style box around the face.
    image_path = registered["aflw2000"] / f"{FACE}.jpg"
    result = frnet(["predict", "--model-uri", model_uri, "--tracking-uri", store, str(image_path),
                    "--box", "150,190,340,410", "--out", str(tmp_path / "predict")], root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "predict" / f"{FACE}.json").read_text())
    crop_box = np.array(record["crop_box"])
    expected_landmarks = np.array(record["landmarks"]).T[:2]  # (2, 68) image pixels

    # The same crop for the pulled model, and the reference data's 256-pixel crop of this face.
    crops = tmp_path / "crops"
    crops.mkdir()
    np.save(crops / "predict_crop.npy", crop_image(cv2.imread(str(image_path)), crop_box)[None])
    reference = cv2.imread(str(shared_path("aflw2000-3d-image00427", "image00427_roi_crop_256.png")))
    np.save(crops / "reference_256.npy", np.stack([reference, reference]))  # N > 1

    python = clean_python(tmp_path / "clean-env")
    env = {key: value for key, value in os.environ.items() if key not in (*FOREIGN_ENV, "PYTHONPATH")}
    pulled = subprocess.run([str(python), "-c", PULL, store, model_uri, str(crops), "predict_crop",
                             "reference_256"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert pulled.returncode == 0, pulled.stderr[-4000:]
    answer = json.loads(pulled.stdout.strip().splitlines()[-1])
    # The code came with the model, not from this checkout.
    assert not Path(answer["models_from"]).resolve().is_relative_to(REPO_ROOT), answer["models_from"]

    ours = np.array(answer["outputs"]["predict_crop"]["landmarks"])[0].T  # (2, 68) crop pixels
    difference = np.abs(crop_to_image(ours, crop_box) - expected_landmarks).max()
    assert difference < 1e-3, difference
    pose = np.array(answer["outputs"]["predict_crop"]["pose"])[0]
    degrees = record["pose_degrees"]
    np.testing.assert_allclose(pose, [degrees["yaw"], degrees["pitch"], degrees["roll"]], atol=1e-6)

    # The reference route: 2.78% NME against pts68 for 3DDFA_V2's 0-based crop pixels; ours are
    # 1-based, one 120-pixel unit more in x and y.
    landmarks_256 = np.array(answer["outputs"]["reference_256"]["landmarks"])
    assert np.array_equal(landmarks_256[0], landmarks_256[1])
    protocol = shared / "aflw2000-3d" / "protocol"
    truth = np.load(protocol / "AFLW2000-3D.pts68.npy")[FACE_INDEX][:2]
    sx, sy, ex, ey = np.load(protocol / "AFLW2000-3D_crop.roi_box.npy")[FACE_INDEX][:4]
    truth_120 = np.stack([(truth[0] - sx) * 120 / (ex - sx), (truth[1] - sy) * 120 / (ey - sy)])
    error = float(nme(landmarks_256[0].T * 120 / 256 - 1, truth_120))
    assert error == pytest.approx(0.0278, abs=0.0005), error
    print(f"clean environment: cold load {answer['cold_load_s']:.1f} s, landmark difference "
          f"{difference:.2e} px, reference NME {100 * error:.3f}%")

    # Served: the same crop posted to `mlflow models serve` gets the same answer.
    (port,) = free_ports(1)
    server, log_path = keeper.start("serve", [
        str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
        "-h", "127.0.0.1", "-p", str(port)],
        # It starts `uvicorn` by name: the venv's, as in an activated virtualenv.
        {**env, "MLFLOW_TRACKING_URI": store, "PATH": os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])})
    wait_for_url(server, log_path, f"http://127.0.0.1:{port}/ping",
                 Deadline(SERVER_UP_S, "waiting for `mlflow models serve` to answer /ping"))
    crop = np.load(crops / "predict_crop.npy")
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps({"inputs": crop.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        served = json.loads(response.read())["predictions"]
    np.testing.assert_allclose(np.array(served["landmarks"])[0].T, ours, atol=1e-6)
    np.testing.assert_allclose(np.array(served["pose"])[0], pose, atol=1e-6)
    # The model's input contract over HTTP, as in-process: nothing cast, a refusal is a 400 that
    # names the reason and no path of the server; an empty batch is answered empty.
    refused = {"floats 0..1": ((crop / 255.0).tolist(), "got dtype float64"),
               "booleans": ((crop > 127).tolist(), "got dtype bool"),
               "a 2x2 crop": (crop[:, :2, :2].tolist(), "crops of at least 32x32 pixels, got 2x2")}
    for case, (body, reason) in refused.items():
        status, answer = post(port, {"inputs": body})
        assert status == 400 and reason in answer, f"{case}: {status} {answer[:500]}"
        assert "stack_trace" not in answer and str(REPO_ROOT) not in answer and "site-packages" not in answer
    status, answer = post(port, {"inputs": []})
    assert status == 200 and json.loads(answer)["predictions"] == {"landmarks": [], "pose": [], "params": []}
    assert not keeper.stop({server.pid})


def post(port: int, body: dict) -> tuple[int, str]:
    """POST ``body`` as JSON to the served model; (HTTP status, body text)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_version_logged_before_the_self_contained_form_still_loads(tmp_path):
    """Old versions (a pickled network with the model file under extra_files/) are read by the
    project's own commands through that file, never by unpickling the network."""
    network = build_model("mobile-frnet", 0.25)
    stats = ParamStats(np.zeros(62), np.ones(62))
    bundle = ModelBundle("mobile-frnet", 0.25, network.state_dict(), stats, "synthetic", "synthetic-head@x")
    model_file = tmp_path / "old.pt"
    save_bundle(model_file, bundle)
    previous = mlflow.get_tracking_uri()
    try:
        open_store("", tmp_path / "run", "old")
        with mlflow.start_run() as run:
            info = mlflow.pytorch.log_model(network, name="model", serialization_format="pickle",
                                            extra_files=[str(model_file)])
        mlflow.register_model(info.model_uri, "old-format")
        fetched = bundle_from_model_uri("models:/old-format/1")
    finally:
        mlflow.set_tracking_uri(previous)
    assert fetched.arch == "mobile-frnet" and fetched.width == 0.25 and run.info.run_id
    for key, value in bundle.state_dict.items():
        assert torch.equal(fetched.state_dict[key], value)
