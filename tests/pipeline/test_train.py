"""Ray Train on the shards, end to end: DDP on two workers, MLflow, the model file, resuming."""

import json
import sys
from dataclasses import replace

import mlflow
import numpy as np
import pytest

from models.checkpoint import load_bundle
from pipeline.runtime.config import ConfigError
from pipeline.training.config import DataConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig
from pipeline.training.run import train
from preprocessing.synth import SynthConfig, generate

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def shards(shard_set):
    return shard_set


def small_config(shards, name: str, epochs: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        data=DataConfig(shards=str(shards), batch_size=8, shuffle_buffer=16, eval_batch_size=16),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.4),
        run=RunConfig(name=name, max_failures=0),
    )


@pytest.fixture(scope="module")
def first_run(shards, tmp_path_factory):
    """A two-epoch run, registered as the store's first champion; later tests add to its store."""
    run_dir = tmp_path_factory.mktemp("first-run") / "run"
    return run_dir, train(small_config(shards, "t1", epochs=2), run_dir)


def test_training_logs_to_mlflow_and_resumes(shards, first_run):
    run_dir, result = first_run
    figures = result.to_json()
    assert result.registration is not None and result.registration.model_version == "1"
    assert figures["tracking_uri"] == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    client = mlflow.MlflowClient(figures["tracking_uri"])
    run = client.get_run(figures["run_id"])
    assert run.data.params["loss.lambda1"] == "1.0" and run.data.params["model.arch"] == "mobile-frnet"
    history = client.get_metric_history(figures["run_id"], "val_nme")
    assert [m.step for m in history] == [1, 2]
    assert all(np.isfinite(m.value) for m in history)
    assert run.info.artifact_uri.startswith((run_dir.resolve() / "mlartifacts").as_uri())
    artifacts = {a.path for a in client.list_artifacts(figures["run_id"])}
    assert {"config.yaml", "config.json", "manifest.json"} <= artifacts

    # The logged model and the model file compute the same thing.
    bundle, training = load_bundle(figures["model_file"])
    assert training["epoch"] == figures["best"]["epoch"]
    logged = mlflow.pyfunc.load_model(figures["model_uri"])
    crops = np.random.default_rng(0).integers(0, 256, (2, 120, 120, 3), dtype=np.uint8)
    predictor = bundle.predictor()
    np.testing.assert_allclose(logged.predict(crops)["params"], predictor.predict_params(crops), rtol=1e-5)
    image = np.zeros((200, 200, 3), np.uint8)
    prediction = predictor.predict(image, box=np.array([40.0, 40.0, 160.0, 160.0]))
    assert prediction.landmarks.shape == (3, 68)

    # Evaluated on AFLW2000-3D and registered as the first champion, with its figures as tags.
    assert sum(b["count"] for b in figures["aflw2000"]["bins"]) == 4
    assert figures["model_version"] == "1" and figures["champion"]
    champion = client.get_model_version_by_alias("mobile-frnet", "champion")
    assert str(champion.version) == "1"
    assert float(champion.tags["aflw2000.nme_mean_of_bins"]) == pytest.approx(
        figures["aflw2000"]["nme_mean_of_bins"], rel=1e-5)
    by_alias = mlflow.pyfunc.load_model("models:/mobile-frnet@champion")
    np.testing.assert_allclose(by_alias.predict(crops)["params"], predictor.predict_params(crops), rtol=1e-5)

    # The name is taken: without --resume it is refused, and a finished run cannot be resumed.
    taken = r"a run named 't1' exists \(MLflow run \w+ \(finished\), checkpoints in .*: give another name"
    with pytest.raises(ConfigError, match=taken + r" .* or --resume to continue it"):
        train(small_config(shards, "t1", epochs=3), run_dir)
    with pytest.raises(ConfigError, match=r"--resume: the run named 't1' \(MLflow run \w+\) finished"):
        train(small_config(shards, "t1", epochs=2), run_dir, resume=True)
    with pytest.raises(ConfigError, match="--resume: no run named 'nothing' to continue"):
        train(small_config(shards, "nothing", epochs=2), run_dir, resume=True)

    # A second run, its learning rate scaled from a reference batch of 32 to the global 2 x 8:
    # 0.02 x 16 / 32, times the warm-up's 0.2 in epoch 1. It registers version 2, the champion
    # only if its NME is lower.
    scaled = replace(small_config(shards, "t1-again", epochs=1),
                     optim=OptimConfig(reference_batch=32, lr_scaling="linear"))
    again = train(scaled, run_dir).to_json()
    params = client.get_run(again["run_id"]).data.params
    assert float(params["optim.effective_lr"]) == pytest.approx(0.01) and params["optim.global_batch"] == "16"
    assert client.get_metric_history(again["run_id"], "lr")[0].value == pytest.approx(0.002)
    better = again["aflw2000"]["nme_mean_of_bins"] < figures["aflw2000"]["nme_mean_of_bins"]
    assert again["model_version"] == "2" and again["champion"] == better
    expected = "2" if better else "1"
    assert str(client.get_model_version_by_alias("mobile-frnet", "champion").version) == expected


def test_evaluate_pulls_the_champion_by_alias(first_run, tmp_path):
    """`frnet evaluate --model-uri models:/NAME@champion` on a synthetic AFLW2000-3D folder."""
    import subprocess

    figures = first_run[1].to_json()
    generate(SynthConfig("aflw2000-3d", n=3, seed=33), tmp_path / "AFLW2000")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "evaluate", "--model-uri", "models:/mobile-frnet@champion",
         "--tracking-uri", figures["tracking_uri"], "--aflw2000", str(tmp_path / "AFLW2000"),
         "--json", str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert len(report["aflw2000"]["per_image"]) == 3

    # `frnet predict` pulls the same champion and writes landmarks, pose, overlay and mesh.
    images = [str(tmp_path / "AFLW2000" / f"image0000{i}.jpg") for i in range(2)]
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "predict", "--model-uri", "models:/mobile-frnet@champion",
         "--tracking-uri", figures["tracking_uri"], *images, "--box", "140,120,320,330",
         "--out", str(tmp_path / "pred")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "pred" / "image00001.json").read_text())
    assert len(record["landmarks"]) == 68 and set(record["pose_degrees"]) == {"pitch", "yaw", "roll"}
    assert (tmp_path / "pred" / "image00001_overlay.png").stat().st_size > 1000
    mesh = (tmp_path / "pred" / "image00001.obj").read_text().splitlines()
    assert sum(line.startswith("v ") for line in mesh) == 5802


def test_an_epoch_checkpointed_but_not_logged_is_logged_from_its_checkpoint(shards, first_run):
    """A stop between Ray Train registering an epoch's checkpoint and the epoch reaching MLflow:
    the resumed run logs that epoch's figures from the checkpoint, once."""
    from pipeline.runtime.tracking import TrackingTarget
    from pipeline.training.run import log_unlogged_epoch

    run_dir, result = first_run
    store = result.tracking_uri
    client = mlflow.MlflowClient(store)
    experiment_id = client.get_experiment_by_name("mobile-frnet").experiment_id
    bare = TrackingTarget(store, client.create_run(experiment_id, run_name="no-epochs-yet").info.run_id)
    config = small_config(shards, "t1", epochs=2)
    log_unlogged_epoch(config, run_dir, bare)
    log_unlogged_epoch(config, run_dir, bare)
    logged = client.get_metric_history(bare.run_id, "val_nme")
    original = {m.step: m.value for m in client.get_metric_history(result.run_id, "val_nme")}
    assert [(m.step, m.value) for m in logged] == [(2, pytest.approx(original[2]))]
