"""Real two-node Ray clusters on this machine: a head (`ray start --head`) and a second node
(`ray start --address`) in a mount namespace of its own in which the head's run folder and Ray
temp dir are empty (a node that does not share the head's disk). Nothing is mounted on both
nodes: the raw datasets, the shards, the checkpoints and the sweep's storage are on an S3
endpoint on loopback (:mod:`tests.pipeline.s3_harness`). The nodes are started without the S3
variables: each stage's driver has them, and its job hands them to every worker. One cluster
serves the module; its shards are preprocessed on it once, from the bucket to the bucket:

- `ray job submit` of a short training run whose two workers land on different nodes, log to an
  MLflow server (sqlite store, artifacts on S3) and register a model that is then pulled back by
  alias through the server; its checkpoints go to a folder both nodes see (one machine: a
  folder stands for NFS);
- with the default sqlite MLflow store on the head, training and a sweep run on both nodes with
  their storage on S3, and a folder only the head sees is refused before any work, in one line;
- last, a node is lost in the middle of a run, which resumes on the head from its checkpoint on
  S3.

How the cluster stays out of other people's way: :mod:`tests.pipeline.cluster_harness`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.fs as pafs
import pytest
import yaml

from models.checkpoint import load_bundle
from pipeline.runtime.tracking import bundle_from_model_uri
from preprocessing.synth import SynthConfig, generate
from tests.pipeline.cluster_harness import (
    FOREIGN_ENV,
    REPO_ROOT,
    VENV_BIN,
    Cluster,
    Deadline,
    Processes,
    free_ports,
    kept_processes,
    kill_raylet,
    ray_cli,
    start_cluster,
    store_has_run,
    tail,
    wait_for_mlflow,
)
from tests.pipeline.pull_harness import PULL, clean_python
from tests.pipeline.s3_harness import S3Endpoint, s3_endpoint

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux mount namespaces"),
    pytest.mark.skipif(os.geteuid() != 0, reason="hiding folders from a node needs root (unshare --mount)"),
]

TEST_BOUND_S = 420  # each test, a hang included
MULTINODE_MODEL = "frnet-multinode"
MODEL_NAME = "frnet-no-shared-disk"
REFUSAL = "use a folder every node mounts (NFS) or an s3:// URI"
BUCKET = "frnet-two-nodes"
TRIAL_SLOT = "trial_slot"  # a custom resource: one unit on each node
NODE_LOSS_EPOCHS = 4


@dataclass
class TwoNodes:
    keeper: Processes
    temp_dir: Path
    cluster: Cluster
    s3: S3Endpoint
    head_only: Path  # a folder the second node does not see
    configs: Path  # the drivers' config files (read on the head only)

    @property
    def run_dir(self) -> Path:
        """The head's run folder: its sqlite MLflow store, unseen by the second node."""
        return self.head_only / "run"

    @property
    def env(self) -> dict[str, str]:
        """A driver's environment: the cluster's, and the S3 variables its job hands on."""
        return self.cluster.env | self.s3.env

    @property
    def bucket(self) -> str:
        return f"s3://{BUCKET}"

    @property
    def shards(self) -> str:
        return f"{self.bucket}/shards"  # preprocessed on the cluster


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Iterator[TwoNodes]:
    root = tmp_path_factory.mktemp("two-nodes")
    head_only, configs, raw = root / "head", root / "configs", root / "raw"
    (head_only / "run").mkdir(parents=True)
    configs.mkdir()
    generate(SynthConfig("300w-lp", n=8, seed=41, views_per_face=4), raw / "300W_LP")
    generate(SynthConfig("aflw2000-3d", n=4, seed=42), raw / "AFLW2000")
    (configs / "preprocess.yaml").write_text(yaml.safe_dump({"val_fraction": 0.3, "augment": {"copies": 2}}))
    env = {key: value for key, value in os.environ.items()
           if key not in FOREIGN_ENV and not key.startswith("AWS_")}
    with s3_endpoint(root / "s3-logs") as (s3, _), kept_processes(root / "logs") as (keeper, temp_dir):
        s3.make_bucket(BUCKET)
        pafs.copy_files(str(raw), f"{BUCKET}/raw", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=s3.filesystem())
        shutil.rmtree(raw)  # the data is in the bucket only
        deadline = Deadline(TEST_BOUND_S, "starting the cluster and preprocessing on it")
        cluster = start_cluster(keeper, temp_dir, env, deadline, hide=[head_only], resources={TRIAL_SLOT: 1})
        assert len(cluster.node_ids) == 2
        nodes = TwoNodes(keeper, temp_dir, cluster, s3, head_only, configs)
        status, output = stage(nodes, "preprocess", [*preprocess_args(nodes), "--output", nodes.shards],
                               deadline)
        assert status == 0, output[-3000:]
        yield nodes


def preprocess_args(nodes: TwoNodes) -> list[str]:
    return ["preprocess", "--input", f"{nodes.bucket}/raw/300W_LP",
            "--aflw2000", f"{nodes.bucket}/raw/AFLW2000", "--config", str(nodes.configs / "preprocess.yaml")]


def stage(nodes: TwoNodes, name: str, arguments: list[str], deadline: Deadline) -> tuple[int, str]:
    """A stage's driver on the head (RAY_ADDRESS names the cluster): (exit status, output)."""
    return nodes.keeper.run(name, [sys.executable, "-m", "pipeline.cli", *arguments], nodes.env,
                            deadline.left(300))


def refusal_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if REFUSAL in line]


def training_config(shards: str, storage: str) -> dict:
    return {
        "epochs": 2,
        "data": {"shards": str(shards), "batch_size": 8, "shuffle_buffer": 16, "eval_batch_size": 16},
        # One worker on each node (see multinode_config for why STRICT_SPREAD and 0.4 CPU).
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.4, "placement_strategy": "STRICT_SPREAD"},
        "run": {"name": "no-shared-disk", "storage_path": storage, "max_failures": 0},
        "mlflow": {"experiment": "no-shared-disk", "registered_model": MODEL_NAME},  # sqlite on the head
    }


def multinode_config(shards: str, storage: Path, tracking_uri: str) -> dict:
    return {
        "epochs": 2,
        "data": {"shards": str(shards), "batch_size": 8, "shuffle_buffer": 16, "eval_batch_size": 16},
        # STRICT_SPREAD, not SPREAD: one worker per node is what this test is about, so it is a
        # requirement Ray must meet, not a preference it may drop when a node looks busy (both
        # workers would fit on the head). 0.4 CPU each leaves the head a CPU for Ray Data.
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.4, "placement_strategy": "STRICT_SPREAD"},
        # One machine, so a local folder stands for the shared storage a real cluster needs.
        "run": {"name": "multinode", "storage_path": str(storage), "max_failures": 0},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "multinode",
                   "registered_model": MULTINODE_MODEL},
    }


def submit_training(processes: Processes, cluster: Cluster, s3: S3Endpoint, config_path: Path, run_dir: Path,
                    figures_path: Path, deadline: Deadline) -> None:
    """`ray job submit` of pipeline/train.py with this checkout as the working directory and the
    S3 variables in the job's environment. The entrypoint's `python` is the venv's through the
    nodes' PATH (see :func:`start_cluster`)."""
    submission_id = f"frnet-multinode-{secrets.token_hex(4)}"
    excludes = [".venv", ".git", "runs", "data", "**/__pycache__", ".pytest_cache", ".ruff_cache"]
    status, output = processes.run("job-submit", [
        str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
        "--submission-id", submission_id, "--working-dir", str(REPO_ROOT),
        "--runtime-env-json", json.dumps({"excludes": excludes, "env_vars": s3.env}),
        "--", "python", "pipeline/train.py", "--config", str(config_path), "--run-dir", str(run_dir),
        "--json", str(figures_path),
    ], cluster.env, deadline.left())
    if status != 0 or not figures_path.exists():
        _, logs = ray_cli(processes, cluster.env, "job-logs",
                          ["job", "logs", "--address", cluster.dashboard_url, submission_id], 60)
        pytest.fail(f"the training job {submission_id} failed (ray job submit: {status}); "
                    f"ray job logs:\n{logs[-6000:]}")


# -- the tests --------------------------------------------------------------------------------

def test_training_job_on_two_nodes_registers_a_model(two_nodes, tmp_path):
    keeper, cluster = two_nodes.keeper, two_nodes.cluster
    deadline = Deadline(TEST_BOUND_S, "the multi-node test")
    gcs_port = cluster.gcs_address.rpartition(":")[2]
    assert (two_nodes.temp_dir / "head" / "ray_current_cluster").read_text().strip().endswith(f":{gcs_port}")
    (mlflow_port,) = free_ports(1)
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    # The server keeps the artifacts in the bucket (as cluster.yaml starts it); its clients reach
    # them through it, with no S3 variables of their own.
    env = {key: value for key, value in os.environ.items() if key not in FOREIGN_ENV} | two_nodes.s3.env
    server, server_log = keeper.start("mlflow-server", [
        str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination", f"{two_nodes.bucket}/mlartifacts", "--host", "127.0.0.1",
        "--port", str(mlflow_port), "--workers", "1"], env)
    wait_for_mlflow(server, server_log, tracking_uri, deadline)

    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(multinode_config(two_nodes.shards, tmp_path / "ray-storage",
                                                           tracking_uri)))
    figures_path = tmp_path / "figures.json"
    submit_training(keeper, cluster, two_nodes.s3, config_path, tmp_path / "run", figures_path, deadline)
    figures = json.loads(figures_path.read_text())

    # The two workers ran on the two nodes of this cluster.
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(figures["run_id"])
    worker_nodes = run.data.tags["train.node_ids"].split(",")
    assert len(worker_nodes) == 2 and set(worker_nodes) == cluster.node_ids, (worker_nodes, cluster.node_ids)
    assert [m.step for m in client.get_metric_history(figures["run_id"], "val_nme")] == [1, 2]

    # Registered as the champion on the server; pulled back by alias, it computes what the model
    # file the job wrote computes, and so does the model file logged with it.
    assert figures["champion"]
    champion = client.get_model_version_by_alias(MULTINODE_MODEL, "champion")
    assert str(champion.version) == figures["model_version"]
    bundle, _ = load_bundle(figures["model_file"])
    crops = np.random.default_rng(0).integers(0, 256, (2, 120, 120, 3), dtype=np.uint8)
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")  # mlflow keeps the two in step
    mlflow.set_tracking_uri(tracking_uri)
    try:
        by_alias = mlflow.pyfunc.load_model(f"models:/{MULTINODE_MODEL}@champion")
        fetched = bundle_from_model_uri(f"models:/{MULTINODE_MODEL}@champion", tracking_uri)
    finally:
        mlflow.set_tracking_uri(previous_uri)
    expected = bundle.predictor().predict_params(crops)
    np.testing.assert_allclose(by_alias.predict(crops)["params"], expected, rtol=1e-5)
    np.testing.assert_allclose(fetched.predictor().predict_params(crops), expected, rtol=1e-5)
    # A Python without this project and without the S3 variables pulls it through the server too.
    (tmp_path / "crops").mkdir()
    np.save(tmp_path / "crops" / "random.npy", crops)
    clean_env = {key: value for key, value in os.environ.items()
                 if key not in (*FOREIGN_ENV, "PYTHONPATH") and not key.startswith(("AWS_", "MLFLOW_S3"))}
    pulled = subprocess.run([str(clean_python(tmp_path / "clean-env")), "-c", PULL, tracking_uri,
                             f"models:/{MULTINODE_MODEL}@champion", str(tmp_path / "crops"), "random"],
                            cwd=tmp_path, env=clean_env, capture_output=True, text=True,
                            timeout=deadline.left(300))
    assert pulled.returncode == 0, pulled.stderr[-4000:]
    answer = json.loads(pulled.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(np.array(answer["outputs"]["random"]["params"]), expected, rtol=1e-5)
    # ... and what the server handed out came from the bucket.
    stored = two_nodes.s3.filesystem().get_file_info(
        pafs.FileSelector(f"{BUCKET}/mlartifacts", recursive=True))
    assert any(info.path.endswith("/model.pt") or info.path.endswith("MLmodel") for info in stored), \
        [info.path for info in stored][:20]


def test_two_nodes_without_a_shared_disk(two_nodes):
    cluster, bucket, configs, head_only, run_dir = (two_nodes.cluster, two_nodes.bucket, two_nodes.configs,
                                                    two_nodes.head_only, two_nodes.run_dir)
    deadline = Deadline(TEST_BOUND_S, "the no-shared-disk test")

    def refused(name: str, arguments: list[str], setting: str) -> None:
        """The stage stops before any work with one line naming ``setting`` (and no traceback)."""
        status, output = stage(two_nodes, name, arguments, deadline)
        lines = refusal_lines(output)
        assert status == 1 and len(lines) == 1 and f"{setting} " in lines[0], output[-3000:]
        assert "Traceback" not in output
        print(lines[0])

    # Preprocessing: shards on the head's disk alone are refused before any shard is written
    # (the module's shards were written to the bucket).
    refused("preprocess-head-only", [*preprocess_args(two_nodes), "--output", str(head_only / "shards")],
            "--output")
    assert not (head_only / "shards" / "manifest.json").exists()

    # Training: checkpoints on the head's disk (the empty storage_path's default) are refused, and
    # so are shards there.
    head_config = head_only / "train-head-storage.yaml"
    head_config.write_text(yaml.safe_dump(training_config(two_nodes.shards, "")))
    train = ["train", "--config", str(head_config), "--run-dir", str(run_dir)]
    refused("train-head-storage", train, "run.storage_path (empty: RUN_DIR/ray)")
    pafs.copy_files(two_nodes.shards.removeprefix("s3://"), str(head_only / "shards-copy"),
                    source_filesystem=two_nodes.s3.filesystem(),
                    destination_filesystem=pafs.LocalFileSystem())
    refused("train-head-shards", [*train, "--shards", str(head_only / "shards-copy"), "--storage",
                                  f"{bucket}/ray-storage"], "data.shards")

    # The same config with checkpoints in the bucket (the flag over the config's empty
    # storage_path): the node check writes its token there and every node reads it back.
    (configs / "train.yaml").write_text(yaml.safe_dump(training_config(two_nodes.shards, "")))
    status, output = stage(two_nodes, "train", [
        "train", "--config", str(configs / "train.yaml"), "--storage", f"{bucket}/ray-storage",
        "--run-dir", str(run_dir), "--json", str(head_only / "train.json")], deadline)
    assert status == 0, output[-3000:]
    figures = json.loads((head_only / "train.json").read_text())
    store = f"sqlite:///{run_dir / 'mlflow.db'}"
    assert figures["tracking_uri"] == store and figures["champion"]
    client = mlflow.MlflowClient(store)
    assert set(client.get_run(figures["run_id"]).data.tags["train.node_ids"].split(",")) == cluster.node_ids
    assert [m.step for m in client.get_metric_history(figures["run_id"], "val_nme")] == [1, 2]
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == figures["model_version"]
    checkpoints = two_nodes.s3.filesystem().get_file_info(
        pafs.FileSelector(f"{BUCKET}/ray-storage/no-shared-disk", recursive=True))
    assert any("/checkpoint_" in info.path for info in checkpoints)
    assert two_nodes.s3.env["AWS_SECRET_ACCESS_KEY"] not in output  # the key is never printed

    # A sweep of two trials at once, one on each node (each node has one TRIAL_SLOT), both logged
    # to the same store on the head.
    (configs / "tune.yaml").write_text(yaml.safe_dump({
        "name": "no-shared-disk-sweep", "train_config": "train.yaml", "epochs": 1,
        "trial": {"num_workers": 1, "cpus_per_worker": 0.4, "resources_per_worker": {TRIAL_SLOT: 1}},
        "max_concurrent_trials": 2, "register": False}))
    (configs / "space.yaml").write_text(yaml.safe_dump({
        "num_samples": 2, "searcher": {"name": "random", "seed": 0}, "scheduler": {"name": "fifo"},
        "space": {"loss.lambda2": {"distribution": "choice", "values": [0.05, 0.1]}}}))
    tune = ["tune", "--config", str(configs / "tune.yaml"), "--space", str(configs / "space.yaml"),
            "--run-dir", str(run_dir)]
    refused("tune-head-storage", tune, f"{configs / 'tune.yaml'}: storage_path")
    status, output = stage(two_nodes, "tune", [*tune, "--storage", f"{bucket}/tune-storage",
                                               "--json", str(head_only / "tune.json")], deadline)
    assert status == 0, output[-3000:]
    sweep = json.loads((head_only / "tune.json").read_text())
    assert [trial["state"] for trial in sweep["trials"]] == ["completed", "completed"], sweep["trials"]
    trial_nodes = [client.get_run(trial["mlflow_run_id"]).data.tags["train.node_ids"]
                   for trial in sweep["trials"]]
    assert set(trial_nodes) == cluster.node_ids, trial_nodes
    for trial in sweep["trials"]:
        assert [m.step for m in client.get_metric_history(trial["mlflow_run_id"], "val_nme")] == [1]


def test_a_node_lost_mid_run(two_nodes):
    """Last in the module: it leaves the cluster one node short."""
    client = mlflow.MlflowClient(f"sqlite:///{two_nodes.run_dir / 'mlflow.db'}")
    lose_a_node(two_nodes, client, Deadline(TEST_BOUND_S, "the node-loss test"))


def lose_a_node(nodes: TwoNodes, client: mlflow.MlflowClient, deadline: Deadline) -> None:
    """A 4-epoch run on both nodes, its checkpoints in the bucket, whose second node's raylet is
    killed in epoch 2: with run.max_failures 1, Ray Train restarts the workers from the epoch-1
    checkpoint (SPREAD lets both land on the head) and the run finishes every epoch once, in one
    MLflow curve."""
    processes, cluster, configs, run_dir = nodes.keeper, nodes.cluster, nodes.configs, nodes.run_dir
    config = training_config(nodes.shards, f"{nodes.bucket}/ray-storage")
    config.update(epochs=NODE_LOSS_EPOCHS)
    config["run"].update(name="node-loss", max_failures=1)
    config["scaling"].update(placement_strategy="SPREAD")
    config["data"].update(batch_size=2)  # more steps: an epoch of a few seconds
    (configs / "node-loss.yaml").write_text(yaml.safe_dump(config))
    figures_path = nodes.head_only / "node-loss.json"
    popen, log_path = processes.start("train-node-loss", [
        sys.executable, "-m", "pipeline.cli", "train", "--config", str(configs / "node-loss.yaml"),
        "--run-dir", str(run_dir), "--json", str(figures_path)], nodes.env)
    # Epoch 2 has begun once epoch 1 is in the MLflow run (its report, checkpoint included, has
    # been handled by then).
    while not epoch_logged(client, run_dir / "mlflow.db", "node-loss", 1):
        assert popen.poll() is None, f"the run ended before its first epoch was logged:\n{tail(log_path)}"
        deadline.left()
        time.sleep(0.2)
    kill_raylet(cluster)
    killed_at = time.time()
    popen.wait(timeout=deadline.left(400))
    output = log_path.read_text(errors="replace")
    assert popen.returncode == 0, output[-4000:]
    figures = json.loads(figures_path.read_text())
    curve = client.get_metric_history(figures["run_id"], "val_nme")
    assert sorted(m.step for m in curve) == list(range(1, NODE_LOSS_EPOCHS + 1)), curve
    logged = {m.step: m.timestamp / 1000 for m in curve}
    assert logged[1] < killed_at < logged[2], (killed_at, logged)
    # The kill lands during epoch 2; epoch 2's checkpoint may be reported before the node is
    # gone. Either way the run resumes from its last checkpoint and no epoch is logged twice.
    resumed = [int(n) for n in re.findall(r"resumed from the checkpoint of epoch (\d+)", output)]
    assert resumed and resumed[0] in (1, 2), output[-4000:]
    # The epochs after the restart ran on the surviving node alone.
    head = client.get_run(figures["run_id"]).data.tags["train.node_ids"].split(",")
    assert len(set(head)) == 1 and set(head) < cluster.node_ids, head
    print(f"node lost {logged[2] - killed_at:.1f} s before epoch 2's report "
          f"(epoch 3 took {logged[3] - logged[2]:.1f} s, epoch 4 {logged[4] - logged[3]:.1f} s)")


def epoch_logged(client: mlflow.MlflowClient, database: Path, run_name: str, epoch: int) -> bool:
    """Whether the run ``run_name`` has logged ``epoch`` (the store is opened once the driver made
    the run there: see :func:`store_has_run`)."""
    if not store_has_run(database, run_name):
        return False
    experiment = client.get_experiment_by_name("no-shared-disk")
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    return any(m.step == epoch for run in runs for m in client.get_metric_history(run.info.run_id, "val_nme"))
