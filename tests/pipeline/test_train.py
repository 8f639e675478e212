"""Ray Train on the shards, end to end: DDP on two workers, MLflow, the model file, resuming."""

import json
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from models.checkpoint import load_bundle
from pipeline.runtime.config import ConfigError, to_plain
from pipeline.training.config import DataConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig
from pipeline.training.run import train
from preprocessing.synth import SynthConfig, generate
from tests.pipeline.cluster_harness import FOREIGN_ENV, store_has_run, tail

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


def test_training_logs_to_mlflow_and_resumes(shards, tmp_path):
    run_dir = tmp_path / "run"
    result = train(small_config(shards, "t1", epochs=2), run_dir)
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


def test_an_interrupted_run_resumes_on_purpose_in_the_same_mlflow_run(shards, tmp_path, processes):
    """`frnet train` stopped after epoch 2 of 5; then refused without --resume and with another
    learning rate; `--resume` trains the remaining epochs into the same MLflow run."""
    keeper, _ = processes
    run_dir = tmp_path / "run"
    config = to_plain(small_config(shards, "interrupted", epochs=5))
    config["data"]["batch_size"] = 2  # more steps: epochs of a few seconds
    env = {key: value for key, value in os.environ.items() if key not in FOREIGN_ENV}

    def command(config: dict, *flags: str) -> list[str]:
        path = tmp_path / f"train-{len(list(tmp_path.glob('train-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(config))
        return [sys.executable, "-m", "pipeline.cli", "train", "--config", str(path), "--run-dir",
                str(run_dir), "--num-cpus", "2", "--json", str(tmp_path / "figures.json"), *flags]

    popen, log_path = keeper.start("train-interrupted", command(config), env)
    store = f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    while 2 not in epochs_logged(store, "interrupted"):
        assert popen.poll() is None, tail(log_path)
        time.sleep(0.3)
    assert not keeper.stop({popen.pid})
    run_id = run_named(store, "interrupted").info.run_id

    status, output = keeper.run("train-again", command(config), env, 600)
    assert status == 2, output[-3000:]
    # Stopped by SIGTERM, the driver ends its MLflow run as failed; a run whose driver ended before
    # it could record that is marked killed by this next start. Never left running.
    assert re.search(f"a run named 'interrupted' exists \\(MLflow run {run_id} \\((failed|killed)\\), "
                     "checkpoints in ", output), output[-3000:]
    assert mlflow.MlflowClient(store).get_run(run_id).info.status in ("FAILED", "KILLED")
    other_lr = {**config, "optim": {**config["optim"], "lr": 0.04}}
    status, output = keeper.run("train-changed", command(other_lr, "--resume"), env, 600)
    assert status == 2 and "optim.lr: 0.02 -> 0.04" in output, output[-3000:]

    status, output = keeper.run("train-resume", command(config, "--resume"), env, 600)
    assert status == 0, output[-4000:]
    # The stop lands in epoch 3; epoch 3's checkpoint may be in before the driver ends.
    resumed = [int(n) for n in re.findall(r"resumed from the checkpoint of epoch (\d+)", output)]
    assert resumed and resumed[0] in (2, 3), output[-4000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    client = mlflow.MlflowClient(store)
    assert figures["run_id"] == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_nme")) == [1, 2, 3, 4, 5]
    status, output = keeper.run("train-resume-finished", command(config, "--resume"), env, 600)
    assert status == 2 and f"the run named 'interrupted' (MLflow run {run_id}) finished" in output


def run_named(store: str, name: str):
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("mobile-frnet")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, runs
    return runs[0]


def epochs_logged(store: str, name: str) -> set[int]:
    if not store_has_run(Path(store.removeprefix("sqlite:///")), name):
        return set()
    try:
        run = run_named(store, name)
    except (mlflow.exceptions.MlflowException, AttributeError, AssertionError):  # not there yet
        return set()
    return {m.step for m in mlflow.MlflowClient(store).get_metric_history(run.info.run_id, "val_nme")}


def test_evaluate_pulls_the_champion_by_alias(shards, tmp_path):
    """`frnet evaluate --model-uri models:/NAME@champion` on a synthetic AFLW2000-3D folder."""
    import json
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    figures = train(small_config(shards, "t2", epochs=1), run_dir).to_json()
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


def test_a_killed_worker_is_replaced_and_no_finished_epoch_is_lost(shards, tmp_path):
    """SIGKILL one Ray Train worker after the first checkpoint: with max_failures the run
    restarts the workers from the latest checkpoint and finishes every epoch once."""
    import signal
    import subprocess
    import sys
    import time

    import psutil
    import yaml

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "epochs": 4,
        "data": {"shards": str(shards), "batch_size": 8, "shuffle_buffer": 16, "eval_batch_size": 16},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.4},
        "run": {"name": "faulty", "max_failures": 2},
    }))
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(config), "--run-dir", str(run_dir),
         "--num-cpus", "2", "--json", str(tmp_path / "figures.json")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    snapshot = run_dir / "ray" / "faulty" / "checkpoint_manager_snapshot.json"

    def registered_epochs() -> list[int]:
        """Epochs whose checkpoints Ray Train has registered (a checkpoint folder alone may not be)."""
        try:
            results = __import__("json").loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            return []
        return [int(r["metrics"]["epoch"]) for r in results]

    deadline = time.time() + 240
    while time.time() < deadline and not registered_epochs():
        time.sleep(0.1)
    done_before_kill = max(registered_epochs(), default=0)
    assert 1 <= done_before_kill < 4, "the kill must land mid-run, after a registered checkpoint"
    def command_line(child: psutil.Process) -> str:
        """A child's command line, or "" for one that exited (Ray's short-lived helpers do)."""
        try:
            return " ".join(child.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied):
            return ""

    workers = [p for p in psutil.Process(process.pid).children(recursive=True)
               if "RayTrainWorker" in command_line(p)]
    assert workers, "no Ray Train worker process found"
    workers[-1].send_signal(signal.SIGKILL)
    output, _ = process.communicate(timeout=420)
    assert process.returncode == 0, output[-3000:]
    resumed = [int(n) for n in re.findall(r"resumed from the checkpoint of epoch (\d+)", output)]
    assert resumed and resumed[0] >= done_before_kill  # no registered epoch trained again
    figures = __import__("json").loads((tmp_path / "figures.json").read_text())
    client = mlflow.MlflowClient(figures["tracking_uri"])
    steps = sorted({m.step for m in client.get_metric_history(figures["run_id"], "val_nme")})
    assert steps == [1, 2, 3, 4]
