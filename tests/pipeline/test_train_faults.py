"""`frnet train` when things go wrong: shards that are not what the manifest says (refused before
training, or named in one line when a read fails while it runs), a driver killed hard (its
MLflow run marked KILLED at the next start, then continued), SIGTERM, and Ctrl-C (a message, the
command that resumes, exit status 130, the MLflow run KILLED)."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from models.face_models import load_face_model
from models.mobile_frnet import MobileFRNet
from models.predictor import FacePredictor
from pipeline.data.shard_reader import ShardError, shard_read_failure
from pipeline.evaluation.scoring import score_shards
from pipeline.runtime.config import ConfigError, to_plain
from pipeline.runtime.tracking import DRIVER_TAG
from pipeline.train import load_train_config, parse_args
from pipeline.training.config import DataConfig, RunConfig, ScalingConfig, TrainConfig
from pipeline.training.resume import last_saved
from pipeline.training.run import train
from pipeline.training.trainer import make_trainer
from preprocessing.manifest import read_manifest
from tests.pipeline.cluster_harness import FOREIGN_ENV, VENV_BIN, store_has_run, tail

pytestmark = pytest.mark.ray
TRAIN_SHARD = "train/part-00000.parquet"
VAL_SHARD = "val/part-00000.parquet"
# Room for three starts of one run: killed at once, stopped after a checkpoint, then after another.
HALTED_EPOCHS = 6


@pytest.fixture(scope="module")
def shards(shard_set):
    return shard_set


def small_config(shards, name: str, epochs: int, workers: int = 2) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        data=DataConfig(shards=str(shards), batch_size=8, shuffle_buffer=16, eval_batch_size=16),
        scaling=ScalingConfig(num_workers=workers, cpus_per_worker=0.4),
        run=RunConfig(name=name, max_failures=0),
    )


def copy_of(shards: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "shards"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_manifest(shards: Path, edit) -> None:
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def plant(case: str, shards: Path) -> str:
    """Damage a copy of the shards; returns the one-line error training must give."""
    where = f"{shards}/manifest.json"
    if case == "truncated":
        truncate(shards / TRAIN_SHARD)
        return f"{shards}/{TRAIN_SHARD}: not a Parquet file (truncated?)"
    if case == "missing":
        (shards / VAL_SHARD).unlink()
        return f"{shards}/{VAL_SHARD}: missing"
    if case == "split count":
        edit_manifest(shards, lambda m: m["counts"]["rows"].update(train=m["counts"]["rows"]["train"] + 5))
        return f"{where}: counts.rows.train is 21, but the train shards (1 file) hold 16 rows"
    if case == "file count":
        # preprocessing records every file's rows: one of them, edited
        edit_manifest(shards, lambda m: m["counts"]["rows_by_file"].update(
            {VAL_SHARD: m["counts"]["rows_by_file"][VAL_SHARD] - 1}))
        return f"{shards}/{VAL_SHARD}: holds 16 rows, but the manifest's counts.rows_by_file says 15"
    assert case == "evaluation count"
    # inputs too: the counts still reconcile (inputs = written + quarantined + skipped)
    edit_manifest(shards, lambda m: m["aflw2000"]["counts"].update(
        written=m["aflw2000"]["counts"]["written"] - 1, inputs=m["aflw2000"]["counts"]["inputs"] - 1))
    return f"{where}: aflw2000.counts.written is 3, but the aflw2000 shards (1 file) hold 4 rows"


@pytest.mark.parametrize("case", ["truncated", "missing", "split count", "file count", "evaluation count"])
def test_shards_unlike_their_manifest_are_refused_before_training(case, shards, tmp_path):
    """Each plant is found from the footers alone, before any MLflow run or Ray Train run."""
    damaged = copy_of(shards, tmp_path)
    expected = plant(case, damaged)
    run_dir = tmp_path / "run"
    with pytest.raises(ShardError) as caught:
        train(small_config(damaged, "faulty", epochs=1), run_dir)
    assert str(caught.value).startswith(expected), str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (run_dir / "mlflow.db").exists() and not (run_dir / "ray").exists()


@pytest.mark.parametrize("case", ["evaluation count", "morphable model"])
def test_scoring_refuses_shards_unlike_their_manifest_or_the_model(case, shards, tmp_path):
    """The registration gate's scoring reads the AFLW2000-3D shards itself: a manifest whose
    evaluation count or morphable model was edited is refused there too, not scored."""
    damaged = copy_of(shards, tmp_path)
    manifest = read_manifest(str(shards))
    predictor = FacePredictor(MobileFRNet(width=0.25), manifest.whitening,
                              load_face_model(manifest.morphable_model.source))
    if case == "evaluation count":
        expected = plant(case, damaged)
    else:
        edit_manifest(damaged, lambda m: m["morphable_model"].update(identity="0123456789abcdef"))
        expected = (f"{damaged}/manifest.json: morphable_model.identity is 0123456789abcdef, but the model "
                    f"scored was trained with {predictor.model.identity}")
    intact = score_shards(predictor, str(shards), manifest)
    assert sum(b["count"] for b in intact["bins"]) == 4  # the intact set scores
    with pytest.raises(ShardError) as caught:
        score_shards(predictor, str(damaged), read_manifest(str(damaged)))
    assert str(caught.value).startswith(expected), str(caught.value)


def test_the_command_names_the_truncated_shard_in_one_line(shards, tmp_path):
    damaged = copy_of(shards, tmp_path)
    expected = plant("truncated", damaged)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(to_plain(small_config(damaged, "faulty", epochs=1))))
    env = {key: value for key, value in os.environ.items() if key not in FOREIGN_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(config), "--run-dir",
         str(tmp_path / "run"), "--num-cpus", "1"], capture_output=True, text=True, timeout=300, env=env,
        cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"ERROR frnet.train: {expected}"), output[-3000:]
    assert "Traceback" not in output


def test_a_shard_that_breaks_while_training_is_named_in_one_line(shards, tmp_path):
    """The shards pass the check, then change under the run: the read error Ray Train reports
    (the worker's error, Ray's task error, pyarrow's error inside) comes down to the shard."""
    damaged = copy_of(shards, tmp_path)
    manifest = read_manifest(str(damaged))
    config = small_config(damaged, "broken", epochs=1, workers=1)
    trainer = make_trainer(config, tmp_path / "run", manifest, None)
    truncate(damaged / TRAIN_SHARD)  # after the datasets were made: the workers' reads fail
    with pytest.raises(Exception) as caught:
        trainer.fit()
    assert shard_read_failure(caught.value) == f"{damaged}/{TRAIN_SHARD}: not a Parquet file (truncated?)"

    (damaged / TRAIN_SHARD).unlink()  # gone before the datasets are made: the driver's read fails
    with pytest.raises(Exception) as caught:
        make_trainer(config, tmp_path / "run", manifest, None)
    assert shard_read_failure(caught.value) == f"{damaged}/{TRAIN_SHARD}: missing"
    assert shard_read_failure(RuntimeError("not a read")) is None


def test_a_hard_kill_a_stop_and_ctrl_c_leave_a_true_record(shards, tmp_path, processes):
    """SIGKILL the driver once its MLflow run exists: the run stays RUNNING until the next start
    marks it KILLED; `frnet train` then refuses the name without --resume, and with --resume and
    another learning rate. `--resume` continues it, and SIGTERM stops it (the run FAILED or
    KILLED, never left running); `--resume` again, then Ctrl-C stops it with the checkpoint saved,
    the command that resumes, exit status 130 and the run KILLED. That command finishes it from
    there: every epoch once, in the one MLflow run, which cannot be resumed again."""
    keeper, _ = processes
    run_dir, name = tmp_path / "run", "halted"
    config = small_config(shards, name, epochs=HALTED_EPOCHS, workers=1)  # the driver's record is the point
    plain = to_plain(config)
    plain["data"]["batch_size"] = 2  # more steps: epochs of a few seconds
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(plain))
    env = {key: value for key, value in os.environ.items() if key not in FOREIGN_ENV}
    command = [str(VENV_BIN / "frnet"), "train", "--config", str(config_path), "--run-dir", str(run_dir),
               "--num-cpus", "2"]
    store = run_dir.resolve() / "mlflow.db"

    popen, log_path = keeper.start("train-killed", command, env)
    wait_until(lambda: any(DRIVER_TAG in run.data.tags for run in runs_named(store, name)), popen, log_path)
    popen.send_signal(signal.SIGKILL)  # the driver only, as the OOM killer would
    popen.wait(timeout=30)
    assert not keeper.stop({popen.pid})  # the Ray processes it started
    killed = runs_named(store, name)
    assert [run.info.status for run in killed] == ["RUNNING"]  # what a hard kill leaves
    run_id = killed[0].info.run_id
    client = mlflow.MlflowClient(f"sqlite:///{store}")

    # The next start marks it, whatever it then does: a new name ...
    with pytest.raises(ConfigError, match="--resume: no run named 'other' to continue"):
        train(small_config(shards, "other", epochs=HALTED_EPOCHS), run_dir, resume=True)
    assert client.get_run(run_id).info.status == "KILLED"
    # ... or the same name without --resume, refused (exit status 2) and saying so.
    status, output = keeper.run("train-again", command, env, 600)
    assert status == 2 and f"a run named '{name}' exists (MLflow run {run_id} (killed)" in output, \
        output[-3000:]
    other_lr = tmp_path / "train-other-lr.yaml"
    other_lr.write_text(yaml.safe_dump({**plain, "optim": {**plain["optim"], "lr": 0.04}}))
    status, output = keeper.run("train-changed", [*command[:3], str(other_lr), *command[4:], "--resume"],
                                env, 600)
    assert status == 2 and "optim.lr: 0.02 -> 0.04" in output, output[-3000:]

    # SIGTERM once a checkpoint is saved: the driver ends its MLflow run as failed; one that
    # ended before it could record that is marked killed by the next start. Never left running.
    popen, log_path = keeper.start("train-resumed", [*command, "--resume"], env)
    wait_until(lambda: last_saved(config, run_dir) is not None, popen, log_path)
    assert client.get_run(run_id).info.status == "RUNNING"  # continued, not a new run
    assert not keeper.stop({popen.pid})
    stopped_at = last_saved(config, run_dir)[1]

    popen, log_path = keeper.start("train-resumed-again", [*command, "--resume"], env)
    wait_until(lambda: (last_saved(config, run_dir) or ("", 0))[1] > stopped_at, popen, log_path)
    assert client.get_run(run_id).info.status == "RUNNING"
    # Every epoch up to the one SIGTERM's run saved is in MLflow, whether or not it got there
    # before the stop.
    assert {m.step for m in client.get_metric_history(run_id, "val_nme")} >= set(range(1, stopped_at + 1))
    os.killpg(popen.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
    assert popen.wait(timeout=180) == 130, tail(log_path)
    output = log_path.read_text()
    resumed = [int(n) for n in re.findall(r"resumed from the checkpoint of epoch (\d+)", output)]
    assert resumed and resumed[0] == stopped_at, output[-4000:]  # SIGTERM's last checkpoint, none lost
    saved = re.search(rf"interrupted: run '{name}' stopped; saved: the checkpoint of epoch (\d) in "
                      rf"{run_dir.resolve()}/ray/{name}/checkpoint_\S+; MLflow run {run_id} marked KILLED\n",
                      output)
    assert saved and stopped_at < int(saved.group(1)) < HALTED_EPOCHS, tail(log_path)
    resume = re.search(r"^resume with: (frnet train .*)$", output, re.MULTILINE)
    assert resume and resume.group(1) == shlex.join(
        ["frnet", "train", *command[2:], "--name", name, "--resume"]), output[-2000:]
    assert client.get_run(run_id).info.status == "KILLED"

    # The printed command, run here (the session's Ray is up): the epochs after the saved one.
    args = parse_args(shlex.split(resume.group(1))[2:])
    resumed_at = time.time() * 1000
    result = train(load_train_config(args), args.run_dir, resume=args.resume)
    assert result.run_id == run_id
    assert [(run.info.run_id, run.info.status) for run in runs_named(store, name)] == [(run_id, "FINISHED")]
    assert not client.search_runs([killed[0].info.experiment_id], "attributes.status = 'RUNNING'")
    # Each epoch once, though a stop may land between Ray Train registering an epoch's checkpoint
    # and the epoch reaching MLflow: the resumed run then logs it from the checkpoint.
    history = client.get_metric_history(run_id, "val_nme")
    assert sorted(m.step for m in history) == list(range(1, HALTED_EPOCHS + 1))
    after = {m.step for m in history if m.timestamp >= resumed_at} - {int(saved.group(1))}
    assert sorted(after) == list(range(int(saved.group(1)) + 1, HALTED_EPOCHS + 1))  # from its checkpoint
    finished = rf"--resume: the run named '{name}' \(MLflow run {run_id}\) finished"
    with pytest.raises(ConfigError, match=finished):
        train(load_train_config(args), args.run_dir, resume=True)


def wait_until(condition, popen: subprocess.Popen, log_path: Path) -> None:
    """Until ``condition()`` holds, while the command runs."""
    deadline = time.monotonic() + 300
    while not condition():
        assert popen.poll() is None, tail(log_path)
        assert time.monotonic() < deadline, tail(log_path)
        time.sleep(0.2)


def runs_named(store: Path, name: str) -> list:
    """The runs named ``name`` in the sqlite store, none before the driver has made one there."""
    if not store_has_run(store, name):
        return []
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    try:
        experiment = client.get_experiment_by_name("mobile-frnet")
    except mlflow.exceptions.MlflowException:  # its tables still being made
        return []
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
