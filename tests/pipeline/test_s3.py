"""Every stage on S3-compatible object storage, against a real S3 endpoint on loopback (see
:mod:`tests.pipeline.s3_harness`), with no folder shared between the stages: `frnet synth` writes
the raw datasets to a bucket, `frnet preprocess` reads them there and publishes its shards there,
`frnet train` reads the shards there and keeps its checkpoints there (the endpoint taken away
mid-run: the run stops with the command that resumes it, which finishes it from the bucket); the
model file, copied to the bucket, is evaluated, registered and used for prediction there, on the
AFLW2000-3D images in the bucket; an interrupted `frnet preprocess` resumes from the shards in
the bucket. The commands are the user's, run as subprocesses with only the AWS variables pointing
them at the endpoint."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from tests.pipeline.cluster_harness import FOREIGN_ENV, VENV_BIN, free_ports
from tests.pipeline.s3_harness import Relay, S3Endpoint, s3_endpoint

pytestmark = pytest.mark.ray
BUCKET = "frnet-chain"
PREPROCESS = {"morphable_model": "synthetic", "val_fraction": 0.3, "sources_per_shard": 16,
              "augment": {"copies": 1}}
TRAIN = {"epochs": 2, "model": {"width": 0.25},
         "data": {"batch_size": 8, "shuffle_buffer": 16, "eval_batch_size": 16},
         "optim": {"name": "adamw", "lr": 0.001, "warmup_epochs": 0},
         "run": {"name": "on-s3", "max_failures": 0}}


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> S3Endpoint:
    with s3_endpoint(tmp_path_factory.mktemp("s3-server")) as (endpoint, _):
        yield endpoint


def frnet(endpoint_env: dict[str, str], args: list[str], cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """``frnet ARGS`` in a clean environment plus ``endpoint_env``; (exit status, output)."""
    env = {key: value for key, value in os.environ.items()
           if key not in FOREIGN_ENV and not key.startswith("AWS_")} | endpoint_env
    result = subprocess.run([str(VENV_BIN / "frnet"), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def objects(filesystem: pafs.FileSystem, prefix: str) -> list[str]:
    """The object keys under ``prefix`` (bucket/...), relative to it."""
    infos = filesystem.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(info.path.removeprefix(prefix + "/") for info in infos if info.type == pafs.FileType.File)


@pytest.fixture(scope="module")
def chain(s3, tmp_path_factory):
    """synth -> preprocess -> train, every path an s3:// URI; each command's (status, output)."""
    work = tmp_path_factory.mktemp("s3-chain")
    root = s3.make_bucket(BUCKET)
    (work / "preprocess.yaml").write_text(yaml.safe_dump(PREPROCESS))
    (work / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    steps = {}
    steps["synth"] = frnet(s3.env, ["synth", "--layout", "300w-lp", "--n", "12", "--views", "2", "--seed",
                                    "3", "--workers", "1", "--out", f"{root}/raw/300W_LP"], work)
    steps["synth-aflw"] = frnet(s3.env, ["synth", "--layout", "aflw2000-3d", "--n", "4", "--seed", "4",
                                         "--workers", "1", "--out", f"{root}/raw/AFLW2000"], work)
    steps["preprocess"] = frnet(s3.env, ["preprocess", "--input", f"{root}/raw/300W_LP", "--aflw2000",
                                         f"{root}/raw/AFLW2000", "--output", f"{root}/shards", "--config",
                                         "preprocess.yaml", "--num-cpus", "2"], work)
    train = ["train", "--config", "train.yaml", "--shards", f"{root}/shards", "--storage", f"{root}/ray",
             "--run-dir", "run", "--num-cpus", "2", "--json", "train.json"]
    outage = train_through_an_outage(s3, work, train)
    steps["train-stopped"], steps["train"] = outage.pop("stopped"), outage.pop("resumed")
    if steps["train"][0] == 0:  # the model file to the bucket, as `aws s3 cp` would
        model_file = json.loads((work / "train.json").read_text())["model_file"]
        pafs.copy_files(model_file, f"{BUCKET}/models/mobile-frnet.pt",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3.filesystem())
        model, aflw2000 = f"{root}/models/mobile-frnet.pt", f"{root}/raw/AFLW2000"
        steps["evaluate"] = frnet(s3.env, ["evaluate", "--checkpoint", model, "--aflw2000", aflw2000,
                                           "--json", "evaluate.json"], work)
        steps["register"] = frnet(s3.env, ["register", "--checkpoint", model, "--aflw2000", aflw2000,
                                           "--run-dir", "registry", "--json", "register.json"], work)
        images = objects(s3.filesystem(), f"{BUCKET}/raw/AFLW2000")
        image = next(key for key in images if key.endswith(".jpg"))
        steps["predict"] = frnet(s3.env, ["predict", "--checkpoint", model, f"{aflw2000}/{image}", "--out",
                                          "predicted", "--json", "predict.json"], work)
    return {"work": work, "steps": steps, "outage": outage}


OUTAGE_S = 10


def train_through_an_outage(s3: S3Endpoint, work: Path, command: list[str]) -> dict:
    """`frnet ARGS` (a training run, checkpoints in the bucket) reaching the endpoint through a
    relay that takes it away for OUTAGE_S seconds from the moment the run stores its second
    checkpoint (its first registered); then the command the stopped run printed to resume it,
    run as printed once the endpoint is back. The run allows Ray Train no restart (its config's
    ``max_failures`` 0), so it stops: with restarts allowed, whether one lands after the outage
    depends on the machine's speed."""
    relay = Relay(s3.url)
    env = {key: value for key, value in os.environ.items()
           if key not in FOREIGN_ENV and not key.startswith("AWS_")} | relay.endpoint().env
    name = yaml.safe_load((work / command[command.index("--config") + 1]).read_text())["run"]["name"]
    storage = command[command.index("--storage") + 1].removeprefix("s3://")
    log_path = work / "train-stopped.log"
    try:
        with log_path.open("w") as log:
            process = subprocess.Popen([str(VENV_BIN / "frnet"), *command], cwd=work, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 300
            while process.poll() is None and time.monotonic() < deadline:
                # Epoch 1's checkpoint stored and registered (Ray Train's record of the run written).
                if "checkpoint_manager_snapshot.json" in objects(s3.filesystem(), f"{storage}/{name}"):
                    relay.outage_on(f"/{storage}/{name}/checkpoint_".encode(), OUTAGE_S)
                    break
                time.sleep(0.2)
            status = process.wait(timeout=600)
        output = log_path.read_text()
        published = {"model_file": any((work / "run" / "models").glob("*.pt")),
                     "json": (work / "train.json").exists()}
        while not relay.outage_over and time.monotonic() < deadline:
            time.sleep(0.5)
        resume = re.search(r"^resume with: frnet (train .*)$", output, re.MULTILINE)
        resumed = frnet(relay.endpoint().env, shlex.split(resume.group(1)), work) if resume else (None, "")
    finally:
        relay.close()
    return {"stopped": (status, output), "resumed": resumed, "turned_away": relay.turned_away,
            "published_when_stopped": published, "name": name}


def test_synth_writes_the_raw_datasets_to_the_bucket(s3, chain):
    status, output = chain["steps"]["synth"]
    assert status == 0, output[-3000:]
    raw = objects(s3.filesystem(), f"{BUCKET}/raw/300W_LP")
    # 12 images (6 faces x 2 views), each a .jpg and a .mat, in a 300W-LP subset folder and its _Flip twin,
    # the unflipped ones with their landmark file; and the figures file.
    assert sum(key.endswith(".jpg") for key in raw) == 24 and sum(key.endswith(".mat") for key in raw) == 36
    assert "synth.json" in raw and not any(key.endswith(".part") for key in raw)
    assert not (chain["work"] / "s3:").exists()  # nothing written beside the command


def test_preprocess_publishes_shards_and_manifest_on_s3(s3, chain):
    status, output = chain["steps"]["preprocess"]
    assert status == 0, output[-3000:]
    filesystem = s3.filesystem()
    with filesystem.open_input_stream(f"{BUCKET}/shards/manifest.json") as stream:
        manifest = json.loads(stream.read())
    assert manifest["counts"]["inputs"] == 24 and manifest["counts"]["written"] == 24
    assert manifest["aflw2000"]["counts"]["written"] == 4
    shards = [key for key in objects(filesystem, f"{BUCKET}/shards") if key.endswith(".parquet")]
    assert shards and not any(key.endswith(".part") for key in objects(filesystem, f"{BUCKET}/shards"))


def test_train_reads_shards_and_keeps_checkpoints_on_s3(s3, chain):
    status, output = chain["steps"]["train"]
    assert status == 0, output[-3000:]
    figures = json.loads((chain["work"] / "train.json").read_text())
    assert figures["best"]["epoch"] in (1, 2) and figures["champion"]
    stored = objects(s3.filesystem(), f"{BUCKET}/ray/on-s3")
    assert any(key.startswith("checkpoint_") for key in stored), stored[:20]
    assert not (chain["work"] / "run" / "ray").exists()  # the checkpoints went to the bucket only


def test_a_connection_lost_mid_run_stops_it_with_the_command_that_resumes_it(s3, chain):
    """The run met the outage (connections turned away) and stopped in one line naming its
    checkpoint folder in the bucket, with the checkpoint saved (epoch 1's) and the command that
    resumes it, having published nothing (no model file, no figures); that command then finishes
    it from the bucket, every epoch once in the one MLflow run."""
    status, output = chain["steps"]["train-stopped"]
    assert chain["outage"]["turned_away"] > 0 and status == 1, output[-3000:]
    # No traceback of the command's own (Ray's actors may print theirs, forwarded under their names).
    assert not re.search("^Traceback", output, re.MULTILINE), output[-3000:]
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output[-3000:]
    assert f"run 'on-s3' (checkpoints in s3://{BUCKET}/ray/on-s3) stopped: Ray Train gave up on it: " \
        "OSError: " in errors[0] and "NETWORK_CONNECTION" in errors[0], errors[0]
    assert re.search(rf"^failed: run 'on-s3' stopped; saved: the checkpoint of epoch 1 in "
                     rf"s3://{BUCKET}/ray/on-s3/checkpoint_\S+; MLflow run \w+ marked FAILED$",
                     output, re.MULTILINE), output[-3000:]
    assert chain["outage"]["published_when_stopped"] == {"model_file": False, "json": False}
    status, resumed = chain["steps"]["train"]
    assert status == 0, resumed[-3000:]
    assert "resumed from the checkpoint of epoch 1" in resumed, resumed[-3000:]
    figures = json.loads((chain["work"] / "train.json").read_text())
    client = mlflow.MlflowClient(figures["tracking_uri"])
    history = client.get_metric_history(figures["run_id"], "val_nme")
    assert sorted(m.step for m in history) == list(range(1, TRAIN["epochs"] + 1))
    assert client.get_run(figures["run_id"]).info.status == "FINISHED"
    print(errors[0])


def test_the_secret_key_is_nowhere_the_chain_wrote(s3, chain):
    """Not in any object of the bucket (raw data, shards, manifest, checkpoints, the stage's
    files), any file of the run folders (MLflow's store and artifacts, model files), or any
    command's output."""
    secret = s3.env["AWS_SECRET_ACCESS_KEY"]
    filesystem = s3.filesystem()
    for key in objects(filesystem, BUCKET):
        with filesystem.open_input_stream(f"{BUCKET}/{key}") as stream:
            assert secret.encode() not in stream.read(), key
    written = [path for path in chain["work"].rglob("*") if path.is_file()]
    assert any(path.name == "mlflow.db" for path in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    for step, (_, output) in chain["steps"].items():
        assert secret not in output, step


def test_evaluate_register_and_predict_read_their_inputs_from_s3(chain):
    work = chain["work"]
    for step in ("evaluate", "register", "predict"):
        status, output = chain["steps"][step]
        assert status == 0, f"{step}:\n{output[-3000:]}"
    evaluated = json.loads((work / "evaluate.json").read_text())
    registered = json.loads((work / "register.json").read_text())
    assert evaluated["model"]["checkpoint"] == f"s3://{BUCKET}/models/mobile-frnet.pt"
    assert sum(b["count"] for b in evaluated["aflw2000"]["bins"]) == 4
    # The same model on the same faces: the registration gate's figure is the evaluation's.
    assert registered["model_version"] == "1" and registered["champion"]
    assert registered["aflw2000"]["nme_mean_of_bins"] == pytest.approx(
        evaluated["aflw2000"]["nme_mean_of_bins"], rel=1e-6)
    predicted = json.loads((work / "predict.json").read_text())
    faces = predicted["images"]
    assert len(faces) == 1 and faces[0]["image"].startswith(f"s3://{BUCKET}/raw/AFLW2000/image")
    assert len(faces[0]["landmarks"]) == 68 and (work / faces[0]["overlay"]).exists()


def test_an_object_that_is_not_a_model_file_is_named_by_its_uri(s3, chain):
    """Refused (exit 2) in one line naming the URI as given, not the copy the command made."""
    notes = f"s3://{BUCKET}/models/notes.txt"
    with s3.filesystem().open_output_stream(notes.removeprefix("s3://")) as stream:
        stream.write(b"not a model\n")
    for command in (["evaluate", "--checkpoint", notes, "--aflw2000", f"s3://{BUCKET}/raw/AFLW2000"],
                    ["predict", "--checkpoint", notes, f"s3://{BUCKET}/raw/AFLW2000/image00000.jpg"]):
        status, output = frnet(s3.env, command, chain["work"], 180)
        errors = [line for line in output.splitlines() if " ERROR " in line]
        assert status == 2 and len(errors) == 1 and f"{notes}: not a model file" in errors[0], output[-3000:]
        assert "frnet-inputs-" not in output


@pytest.fixture(scope="module")
def strict_s3(tmp_path_factory) -> S3Endpoint:
    """A second endpoint, one that refuses every key pair."""
    with s3_endpoint(tmp_path_factory.mktemp("strict-s3-server"), check_keys=True) as (endpoint, _):
        yield endpoint


@pytest.mark.parametrize("case", ["no bucket", "no manifest", "no endpoint", "refused keys"])
def test_bad_shard_locations_are_one_line_before_ray(s3, chain, case, request):
    """Refused before Ray starts (exit 2), in one line that names the URI and the reason, and
    never the secret key."""
    env, shards = dict(s3.env), f"s3://{BUCKET}/not-shards"
    if case == "no bucket":
        shards = "s3://no-such-bucket/shards"
    elif case in ("no endpoint", "refused keys"):
        url = (request.getfixturevalue("strict_s3").url if case == "refused keys"
               else f"http://127.0.0.1:{free_ports(1)[0]}")
        env.update(AWS_ENDPOINT_URL=url, MLFLOW_S3_ENDPOINT_URL=url)
        shards = f"s3://{BUCKET}/shards"
    status, output = frnet(env, ["train", "--config", "train.yaml", "--shards", shards, "--run-dir",
                                 f"refused-{case.replace(' ', '-')}", "--num-cpus", "2"], chain["work"], 180)
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert status == 2 and len(errors) == 1 and shards in errors[0], output[-3000:]
    assert "Traceback" not in output and "Started a local Ray" not in output
    assert env["AWS_SECRET_ACCESS_KEY"] not in output
    if case == "refused keys":
        assert "refused the credentials" in errors[0], errors[0]
    print(errors[0])


def test_an_interrupted_preprocess_on_s3_resumes_from_the_shards_there(s3, chain):
    """What a killed run leaves in the bucket (no manifest, one shard's completion record
    missing), then the same command: it keeps the complete shard, writes the other again and
    publishes the same manifest, each row once. Runs after the chain, which is done with the
    shards by then."""
    filesystem, prefix = s3.filesystem(), f"{BUCKET}/shards"
    with filesystem.open_input_stream(f"{prefix}/manifest.json") as stream:
        published = json.loads(stream.read())
    records = sorted(key for key in objects(filesystem, prefix) if key.startswith("_shards/train-"))
    assert len(records) == 2, records
    filesystem.delete_file(f"{prefix}/manifest.json")
    filesystem.delete_file(f"{prefix}/{records[-1]}")
    status, output = frnet(s3.env, ["preprocess", "--input", f"s3://{BUCKET}/raw/300W_LP", "--aflw2000",
                                    f"s3://{BUCKET}/raw/AFLW2000", "--output", f"s3://{prefix}", "--config",
                                    "preprocess.yaml", "--num-cpus", "2"], chain["work"])
    # The other training shard and the AFLW2000-3D one kept.
    assert status == 0 and "2 of 3 shards already complete" in output, output[-3000:]
    assert "shard train-00001 done" in output and "shard train-00000 done" not in output
    with filesystem.open_input_stream(f"{prefix}/manifest.json") as stream:
        manifest = json.loads(stream.read())
    assert manifest["counts"] == published["counts"] and manifest["splits"] == published["splits"]
    ids = []
    for name in manifest["splits"]["train"] + manifest["splits"]["val"]:
        ids += pq.read_table(f"{prefix}/{name}", filesystem=filesystem, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == manifest["counts"]["written"]
