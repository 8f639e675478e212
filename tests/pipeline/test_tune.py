"""A Ray Tune sweep of Ray Train runs on synthetic shards: ASHA stops the weak trials, MLflow
holds a parent run with one nested run per trial, an interrupted sweep resumes without
rerunning finished trials, and the best model is registered and loads by alias. An Optuna
sweep with its storage on an S3 endpoint (:mod:`tests.pipeline.s3_harness`) runs two trials at
once on 2 CPUs and resumes, from another run folder given only the storage URI, with the trials
before the interruption known to its searcher."""

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pyarrow.fs as pafs
import pytest
import yaml

from models.checkpoint import load_bundle
from pipeline import tune as tune_stage
from tests.pipeline.cluster_harness import FOREIGN_ENV
from tests.pipeline.s3_harness import S3Endpoint, s3_endpoint

pytestmark = pytest.mark.ray
# The grid runs in order: a sound learning rate, then one that blows the network up (ASHA must
# stop it after its first epoch), then each again. Tune stops a trial while its Train workers go
# on, so a stopped trial may report an epoch or two more: four epochs leave room for that.
LEARNING_RATES = [0.001, 50.0, 0.001, 50.0]
EPOCHS = 4
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory, shard_set):
    root = tmp_path_factory.mktemp("tune-data")
    train = {"data": {"shards": str(shard_set), "batch_size": 8, "shuffle_buffer": 16,
                      "eval_batch_size": 16},
             "optim": {"name": "adamw", "lr": 0.001, "warmup_epochs": 0, "weight_decay": 0.0},
             "run": {"max_failures": 0}}
    (root / "train.yaml").write_text(yaml.safe_dump(train))
    sweep = {"name": "sweep", "train_config": "train.yaml", "epochs": EPOCHS,
             "trial": {"num_workers": 1, "cpus_per_worker": 0.4}, "max_concurrent_trials": 1}
    (root / "tune.yaml").write_text(yaml.safe_dump(sweep))
    space = {"num_samples": 1, "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
             "space": {"optim.lr": {"distribution": "grid", "values": LEARNING_RATES}}}
    (root / "space.yaml").write_text(yaml.safe_dump(space))
    return root


def trial_results(run_dir: Path) -> dict[str, list[dict]]:
    """Tune's per-trial result lines (one per reported epoch), by trial id."""
    results = {}
    for path in sorted((run_dir / "ray" / "sweep").glob("*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        results[path.parent.name] = lines
    return results


def interrupt_during_third_trial(process: subprocess.Popen, run_dir: Path, deadline: float) -> None:
    """Press Ctrl-C (SIGINT) once the third trial has started (one trial runs at a time, so the
    first two have finished: the sound one, and the diverging one that ASHA stopped)."""
    while time.time() < deadline and process.poll() is None:
        if len(trial_results(run_dir)) >= 3:
            process.send_signal(signal.SIGINT)
            return
        time.sleep(1.0)


@pytest.fixture(scope="module")
def sweep(sweep_files, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tune-run")
    common = ["--config", str(sweep_files / "tune.yaml"), "--run-dir", str(run_dir)]
    # The interrupted run is a process of its own with its own local Ray, as at a terminal.
    command = [sys.executable, "-m", "pipeline.cli", "tune", *common,
               "--space", str(sweep_files / "space.yaml"), "--num-cpus", "2"]
    with (run_dir / "interrupted.log").open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            interrupt_during_third_trial(process, run_dir, deadline=time.time() + 600)
            first = process.wait(timeout=180)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    before = trial_results(run_dir)
    resumed = tune_stage.main([*common, "--resume", "--json", str(run_dir / "sweep.json")])
    return {"run_dir": run_dir, "first_exit": first, "resumed_exit": resumed, "before": before,
            "log": (run_dir / "interrupted.log").read_text()[-3000:],
            "whole_log": (run_dir / "interrupted.log").read_text(),
            "figures": json.loads((run_dir / "sweep.json").read_text())}


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep):
    assert sweep["first_exit"] == 130, sweep["log"]
    assert sweep["resumed_exit"] == 0
    before, after = sweep["before"], trial_results(sweep["run_dir"])
    finished = sorted(before)[:2]
    assert len(before[finished[0]]) == EPOCHS and 1 <= len(before[finished[1]]) < EPOCHS
    # The finished trials' results are untouched by the resumed run, and nothing ran twice.
    assert all(after[trial] == before[trial] for trial in finished)
    assert len(after) == len(LEARNING_RATES)
    for trial, lines in after.items():
        epochs = [line["epoch"] for line in lines]
        assert epochs == sorted(set(epochs)), f"{trial} reported an epoch twice: {epochs}"


def test_asha_stops_the_diverging_trials(sweep):
    trials = {t["trial_id"]: t for t in sweep["figures"]["trials"]}
    by_lr = sorted(trials.values(), key=lambda t: t["trial_id"])
    assert [t["searched"]["optim.lr"] for t in by_lr] == LEARNING_RATES
    diverging = [t for t in by_lr if t["searched"]["optim.lr"] == 50.0]
    assert all(t["state"] == "stopped early" and len(t["curve"]) < EPOCHS for t in diverging)
    assert by_lr[0]["state"] == "completed" and len(by_lr[0]["curve"]) == EPOCHS
    best = sweep["figures"]["trials"][0]
    assert best["searched"]["optim.lr"] == 0.001 and sweep["figures"]["best_trial"] == best["trial_id"]
    with (Path(sweep["figures"]["sweep_dir"]) / "results.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [row["trial_id"] for row in rows] == [t["trial_id"] for t in sweep["figures"]["trials"]]
    assert sum(row["state"] == "stopped early" for row in rows) >= 2


def test_mlflow_holds_a_parent_run_and_one_nested_run_per_trial(sweep):
    figures = sweep["figures"]
    client = mlflow.MlflowClient(figures["tracking_uri"])
    parent = client.get_run(figures["parent_run_id"])
    assert parent.data.params["space.optim.lr"] == f"grid{LEARNING_RATES}"
    assert parent.data.metrics["trials_stopped_early"] >= 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/results.csv", "sweep/nme_vs_searched_keys.png", "sweep/validation_curves.png",
            "sweep/space.yaml"} <= artifacts
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trial_ids = sorted(t["trial_id"] for t in figures["trials"])
    assert sorted(r.data.tags["trial_id"] for r in children) == trial_ids
    for child in children:
        trial = next(t for t in figures["trials"] if t["trial_id"] == child.data.tags["trial_id"])
        assert float(child.data.params["optim.lr"]) == trial["searched"]["optim.lr"]
        # A stopped trial's Train run may finish an epoch or two more before it ends: MLflow
        # holds every epoch trained, in order, Tune the ones it took before stopping it.
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_nme"))
        assert steps == list(range(1, len(steps) + 1)) and len(trial["curve"]) <= len(steps) <= EPOCHS
        assert child.info.status == ("FINISHED" if trial["state"] == "completed" else "KILLED")


def test_the_best_trial_is_registered_and_loads_by_alias(sweep):
    figures = sweep["figures"]
    assert figures["model_version"] == "1" and figures["champion"]
    assert sum(b["count"] for b in figures["aflw2000"]["bins"]) == 4
    client = mlflow.MlflowClient(figures["tracking_uri"])
    champion = client.get_model_version_by_alias("mobile-frnet", "champion")
    assert champion.run_id == figures["parent_run_id"]
    assert float(champion.tags["aflw2000.nme_mean_of_bins"]) == pytest.approx(
        figures["aflw2000"]["nme_mean_of_bins"], rel=1e-5)
    bundle, training = load_bundle(figures["model_file"])
    best = figures["trials"][0]["best"]
    assert training["epoch"] == best[0] and training["metrics"]["val_nme"] == pytest.approx(best[1])
    mlflow.set_tracking_uri(figures["tracking_uri"])
    by_alias = mlflow.pyfunc.load_model("models:/mobile-frnet@champion")
    crops = np.random.default_rng(0).integers(0, 256, (2, 120, 120, 3), dtype=np.uint8)
    np.testing.assert_allclose(by_alias.predict(crops)["params"], bundle.predictor().predict_params(crops),
                               rtol=1e-5)


def test_a_second_sweep_of_the_same_name_is_refused(sweep, sweep_files, caplog):
    code = tune_stage.main(["--config", str(sweep_files / "tune.yaml"), "--run-dir", str(sweep["run_dir"]),
                            "--space", str(sweep_files / "space.yaml")])
    assert code == 2 and "--resume continues it" in caplog.text


def test_the_sweep_keeps_asha_rungs_and_writes_the_best_config(sweep, sweep_files):
    """ASHA's rungs survive the interruption (the trials before it still count for the ones after
    it); the console names each ended trial and the best so far, as the sweep ranks them; and the
    best trial's config is written for a longer training run."""
    from pipeline.runtime.config import load_config
    from pipeline.training.config import TrainConfig

    figures = sweep["figures"]
    rungs = json.loads((sweep["run_dir"] / "ray" / "sweep" / "frnet_sweep" / "asha_rungs.json").read_text())
    first_rung = rungs[0][-1]  # rungs run from the last milestone to the first
    assert sorted(first_rung) == sorted(t["trial_id"] for t in figures["trials"])
    first, diverging = sorted(sweep["before"])[:2]
    log = sweep["whole_log"]
    assert f"trial {first} ended: best validation NME" in log
    assert f"best trial so far {first}" in log.split(f"trial {diverging} ended: best validation NME")[1]
    best = figures["trials"][0]
    config = load_config(Path(figures["best_config"]), TrainConfig)
    base = load_config(sweep_files / "train.yaml", TrainConfig)
    assert config.optim.lr == best["searched"]["optim.lr"] and config.epochs == base.epochs != EPOCHS


# -- an Optuna sweep, two trials at once, resumed from another run folder -----------------------

OPTUNA_TRIALS = 5  # two at once: at most four exist when the first ends, so one is sampled after the resume


def ended_trials(log_path: Path) -> int:
    """Trials the sweep's console has reported ended (Tune tells the searcher before that)."""
    return log_path.read_text(errors="replace").count(" ended: best validation NME")


OPTUNA_BUCKET = "frnet-sweeps"


def stored_names(s3: S3Endpoint, prefix: str) -> set[str]:
    """The names of the objects directly under ``prefix`` (bucket/...)."""
    infos = s3.filesystem().get_file_info(pafs.FileSelector(prefix, allow_not_found=True))
    return {info.base_name for info in infos}


def searcher_state(s3: S3Endpoint, name: str) -> dict:
    """Tune's newest saved OptunaSearch state in the bucket (its study is ``_ot_study``)."""
    newest = max(n for n in stored_names(s3, f"{OPTUNA_BUCKET}/{name}") if n.startswith("searcher-state-"))
    with s3.filesystem().open_input_stream(f"{OPTUNA_BUCKET}/{name}/{newest}") as stream:
        return pickle.loads(stream.read())


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> S3Endpoint:
    with s3_endpoint(tmp_path_factory.mktemp("s3-server")) as (endpoint, _):
        yield endpoint


@pytest.fixture(scope="module")
def optuna_sweep(sweep_files, tmp_path_factory, s3):
    """Five one-epoch trials of one 0.4-CPU worker, TPE after two random ones, the sweep's
    storage in a bucket: interrupted once the first trial has ended, then resumed from a second
    run folder (as from another head) given only the storage URI. Each is a `frnet tune` of its
    own with its own local Ray and the S3 variables."""
    root = tmp_path_factory.mktemp("optuna-sweep")
    storage, first_dir, second_dir = f"{s3.make_bucket(OPTUNA_BUCKET)}", root / "head-a", root / "head-b"
    env = {key: value for key, value in os.environ.items()
           if key not in FOREIGN_ENV and not key.startswith("AWS_")} | s3.env
    (root / "tune.yaml").write_text(yaml.safe_dump({
        "name": "optuna-sweep", "train_config": str(sweep_files / "train.yaml"), "epochs": 1,
        "trial": {"num_workers": 1, "cpus_per_worker": 0.4}, "register": False}))
    (root / "space.yaml").write_text(yaml.safe_dump({
        "num_samples": OPTUNA_TRIALS, "searcher": {"name": "optuna", "seed": 0, "startup_trials": 2},
        "scheduler": {"name": "asha", "grace_period": 1},
        "space": {"loss.lambda1": {"distribution": "loguniform", "low": 0.3, "high": 3.0},
                  "optim.lr": {"distribution": "loguniform", "low": 0.0005, "high": 0.005}}}))
    common = [sys.executable, "-m", "pipeline.cli", "tune", "--config", str(root / "tune.yaml"),
              "--storage", storage, "--num-cpus", "2"]
    log_path = root / "interrupted.log"
    command = [*common, "--space", str(root / "space.yaml"), "--run-dir", str(first_dir)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            deadline = time.time() + 600
            while time.time() < deadline and process.poll() is None and ended_trials(log_path) < 1:
                time.sleep(0.5)
            process.send_signal(signal.SIGINT)
            first = process.wait(timeout=180)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    before = searcher_state(s3, "optuna-sweep")
    resumed = subprocess.run([*common, "--run-dir", str(second_dir), "--name", "optuna-sweep", "--resume",
                              "--json", str(root / "sweep.json")], cwd=root, env=env, capture_output=True,
                             text=True, timeout=600)
    return {"s3": s3, "first_dir": first_dir, "second_dir": second_dir, "first_exit": first,
            "resumed_exit": resumed.returncode, "resumed_log": resumed.stdout + resumed.stderr,
            "log": log_path.read_text(errors="replace"), "before": before,
            "after": searcher_state(s3, "optuna-sweep"),
            "figures": json.loads((root / "sweep.json").read_text())}


def test_an_optuna_sweep_runs_to_completion_from_another_run_folder(optuna_sweep):
    assert optuna_sweep["first_exit"] == 130, optuna_sweep["log"][-3000:]
    assert optuna_sweep["resumed_exit"] == 0, optuna_sweep["resumed_log"][-3000:]
    figures = optuna_sweep["figures"]
    assert [t["state"] for t in figures["trials"]] == ["completed"] * OPTUNA_TRIALS
    assert Path(figures["best_config"]).parent == optuna_sweep["second_dir"] / "tune" / "optuna-sweep"
    # The sweep's own files are in its bucket, where the second run folder found them.
    stored = stored_names(optuna_sweep["s3"], f"{OPTUNA_BUCKET}/optuna-sweep/frnet_sweep")
    assert stored >= {"sweep.json", "space.yaml", "tune.yaml", "asha_rungs.json", "results.csv",
                      "best_train.yaml"}
    assert not (optuna_sweep["first_dir"] / "tune" / "optuna-sweep" / "results.csv").exists()
    assert not (optuna_sweep["second_dir"] / "ray").exists()  # no trial kept anything on the head


def test_a_resumed_optuna_sweep_continues_the_searchers_study(optuna_sweep):
    """The trials before the interruption are in the restored study as they were (those that
    ended, with their NME); the trials sampled after it are not a fresh start, which with the
    same seed would draw the first trial's values again."""
    before = optuna_sweep["before"]["_ot_study"].trials
    after = optuna_sweep["after"]["_ot_study"].trials
    told = [t for t in before if t.state == optuna.trial.TrialState.COMPLETE]
    assert told and len(before) < OPTUNA_TRIALS
    assert [(t.number, t.params) for t in after[:len(before)]] == [(t.number, t.params) for t in before]
    assert all(after[t.number].value == t.value for t in told)
    assert len(after) == OPTUNA_TRIALS
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in after)
    assert all(t.params != after[0].params for t in after[len(before):])
    # Every trial's NME as Tune reported it is what the study holds.
    nme = {tuple(sorted(t["searched"].items())): t["curve"][-1][1] for t in optuna_sweep["figures"]["trials"]}
    for trial in after:
        key = tuple(sorted((name.removeprefix("search/"), v) for name, v in trial.params.items()))
        assert trial.value == pytest.approx(nme[key])


def test_two_trials_of_04_cpu_run_at_once_on_2_cpus(optuna_sweep):
    assert "2 trials at once: a trial asks 1 worker(s) x {CPU 0.4}" in optuna_sweep["log"]
    client = mlflow.MlflowClient(optuna_sweep["figures"]["tracking_uri"])
    runs = [client.get_run(t["mlflow_run_id"]).info for t in optuna_sweep["figures"]["trials"]]
    spans = sorted((run.start_time, run.end_time) for run in runs)
    # Some trial started before an earlier one had ended.
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))
