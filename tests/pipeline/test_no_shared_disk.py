"""Two nodes that do not share the head's disk: the second node runs in a mount namespace in
which the head's run directory (and its Ray temp dir) are empty; one folder both see stands for
NFS. Preprocessing, training and a sweep run on both nodes with their shared data there, while
the MLflow store is the default sqlite file on the head; a folder only the head sees is refused
before any work, in one line. Cluster set-up: :mod:`tests.pipeline.cluster_harness`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from preprocessing.synth import SynthConfig, generate
from tests.pipeline.cluster_harness import (
    FOREIGN_ENV,
    Cluster,
    Deadline,
    Processes,
    kill_raylet,
    start_cluster,
    tail,
)

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux mount namespaces"),
    pytest.mark.skipif(os.geteuid() != 0, reason="hiding folders from a node needs root (unshare --mount)"),
]

TEST_BOUND_S = 900
MODEL_NAME = "frnet-no-shared-disk"
REFUSAL = "use a folder every node mounts (NFS) or an s3:// URI"
TRIAL_SLOT = "trial_slot"  # a custom resource: one unit on each node
NODE_LOSS_EPOCHS = 4


def stage(processes: Processes, cluster: Cluster, name: str, arguments: list[str],
          deadline: Deadline) -> tuple[int, str]:
    """A stage's driver on the head (RAY_ADDRESS names the cluster): (exit status, output)."""
    return processes.run(name, [sys.executable, "-m", "pipeline.cli", *arguments], cluster.env,
                         deadline.left(300))


def refusal_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if REFUSAL in line]


def training_config(shards: Path, storage: str) -> dict:
    return {
        "epochs": 2,
        "data": {"shards": str(shards), "batch_size": 8, "shuffle_buffer": 16, "eval_batch_size": 16},
        # One worker on each node (see test_multinode.py for why STRICT_SPREAD and 0.4 CPU).
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.4, "placement_strategy": "STRICT_SPREAD"},
        "run": {"name": "no-shared-disk", "storage_path": storage, "max_failures": 0},
        "mlflow": {"experiment": "no-shared-disk", "registered_model": MODEL_NAME},  # sqlite on the head
    }


def test_two_nodes_without_a_shared_disk(processes, tmp_path):
    keeper, temp_dir = processes
    deadline = Deadline(TEST_BOUND_S, "the no-shared-disk test")
    env = {key: value for key, value in os.environ.items() if key not in FOREIGN_ENV}
    head_only, nfs = tmp_path / "head", tmp_path / "nfs"
    run_dir = head_only / "run"
    run_dir.mkdir(parents=True)
    generate(SynthConfig("300w-lp", n=8, seed=41, views_per_face=4), nfs / "300W_LP")
    generate(SynthConfig("aflw2000-3d", n=4, seed=42), nfs / "AFLW2000")
    (nfs / "preprocess.yaml").write_text(yaml.safe_dump({"val_fraction": 0.3, "augment": {"copies": 2}}))
    cluster = start_cluster(keeper, temp_dir, env, deadline, hide=[head_only], resources={TRIAL_SLOT: 1})
    assert len(cluster.node_ids) == 2

    def refused(name: str, arguments: list[str], setting: str) -> None:
        """The stage stops before any work with one line naming ``setting`` (and no traceback)."""
        status, output = stage(keeper, cluster, name, arguments, deadline)
        lines = refusal_lines(output)
        assert status == 1 and len(lines) == 1 and f"{setting} " in lines[0], output[-3000:]
        assert "Traceback" not in output
        print(lines[0])

    # Preprocessing: shards on the head's disk alone are refused before any shard is written.
    preprocess = ["preprocess", "--input", str(nfs / "300W_LP"), "--aflw2000", str(nfs / "AFLW2000"),
                  "--config", str(nfs / "preprocess.yaml")]
    refused("preprocess-head-only", [*preprocess, "--output", str(head_only / "shards")], "--output")
    assert not (head_only / "shards" / "manifest.json").exists()
    status, output = stage(keeper, cluster, "preprocess", [*preprocess, "--output", str(nfs / "shards")],
                           deadline)
    assert status == 0, output[-3000:]

    # Training: checkpoints on the head's disk (the empty storage_path's default) are refused, and
    # so are shards there.
    head_config = head_only / "train-head-storage.yaml"
    head_config.write_text(yaml.safe_dump(training_config(nfs / "shards", "")))
    train = ["train", "--config", str(head_config), "--run-dir", str(run_dir)]
    refused("train-head-storage", train, "run.storage_path (empty: RUN_DIR/ray)")
    shutil.copytree(nfs / "shards", head_only / "shards-copy")
    refused("train-head-shards", [*train, "--shards", str(head_only / "shards-copy"), "--storage",
                                  str(nfs / "ray-storage")], "data.shards")

    # The same config with shared checkpoints (the flag over the config's empty storage_path).
    (nfs / "train.yaml").write_text(yaml.safe_dump(training_config(nfs / "shards", "")))
    status, output = stage(keeper, cluster, "train", [
        "train", "--config", str(nfs / "train.yaml"), "--storage", str(nfs / "ray-storage"),
        "--run-dir", str(run_dir), "--json", str(head_only / "train.json")], deadline)
    assert status == 0, output[-3000:]
    figures = json.loads((head_only / "train.json").read_text())
    store = f"sqlite:///{run_dir / 'mlflow.db'}"
    assert figures["tracking_uri"] == store and figures["champion"]
    client = mlflow.MlflowClient(store)
    assert set(client.get_run(figures["run_id"]).data.tags["train.node_ids"].split(",")) == cluster.node_ids
    assert [m.step for m in client.get_metric_history(figures["run_id"], "val_nme")] == [1, 2]
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == figures["model_version"]

    # A sweep of two trials at once, one on each node (each node has one TRIAL_SLOT), both logged
    # to the same store on the head.
    (nfs / "tune.yaml").write_text(yaml.safe_dump({
        "name": "no-shared-disk-sweep", "train_config": "train.yaml", "epochs": 1,
        "trial": {"num_workers": 1, "cpus_per_worker": 0.4, "resources_per_worker": {TRIAL_SLOT: 1}},
        "max_concurrent_trials": 2, "register": False}))
    (nfs / "space.yaml").write_text(yaml.safe_dump({
        "num_samples": 2, "searcher": {"name": "random", "seed": 0}, "scheduler": {"name": "fifo"},
        "space": {"loss.lambda2": {"distribution": "choice", "values": [0.05, 0.1]}}}))
    tune = ["tune", "--config", str(nfs / "tune.yaml"), "--space", str(nfs / "space.yaml"),
            "--run-dir", str(run_dir)]
    refused("tune-head-storage", tune, f"{nfs / 'tune.yaml'}: storage_path")
    status, output = stage(keeper, cluster, "tune", [*tune, "--storage", str(nfs / "tune-storage"),
                                                     "--json", str(head_only / "tune.json")], deadline)
    assert status == 0, output[-3000:]
    sweep = json.loads((head_only / "tune.json").read_text())
    assert [trial["state"] for trial in sweep["trials"]] == ["completed", "completed"], sweep["trials"]
    trial_nodes = [client.get_run(trial["mlflow_run_id"]).data.tags["train.node_ids"]
                   for trial in sweep["trials"]]
    assert set(trial_nodes) == cluster.node_ids, trial_nodes
    for trial in sweep["trials"]:
        assert [m.step for m in client.get_metric_history(trial["mlflow_run_id"], "val_nme")] == [1]

    lose_a_node(keeper, cluster, nfs, run_dir, head_only, client, deadline)


def lose_a_node(processes: Processes, cluster: Cluster, nfs: Path, run_dir: Path, head_only: Path,
                client: mlflow.MlflowClient, deadline: Deadline) -> None:
    """A 4-epoch run on both nodes whose second node's raylet is killed in epoch 2: with
    run.max_failures 1, Ray Train restarts the workers from the epoch-1 checkpoint (SPREAD lets
    both land on the head) and the run finishes every epoch once, in one MLflow curve."""
    config = training_config(nfs / "shards", str(nfs / "ray-storage"))
    config.update(epochs=NODE_LOSS_EPOCHS)
    config["run"].update(name="node-loss", max_failures=1)
    config["scaling"].update(placement_strategy="SPREAD")
    config["data"].update(batch_size=2)  # more steps: an epoch of a few seconds
    (nfs / "node-loss.yaml").write_text(yaml.safe_dump(config))
    figures_path = head_only / "node-loss.json"
    popen, log_path = processes.start("train-node-loss", [
        sys.executable, "-m", "pipeline.cli", "train", "--config", str(nfs / "node-loss.yaml"),
        "--run-dir", str(run_dir), "--json", str(figures_path)], cluster.env)
    # Epoch 2 has begun once epoch 1 is in the MLflow run (its report, checkpoint included, has
    # been handled by then).
    while not epoch_logged(client, "node-loss", 1):
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


def epoch_logged(client: mlflow.MlflowClient, run_name: str, epoch: int) -> bool:
    experiment = client.get_experiment_by_name("no-shared-disk")
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    return any(m.step == epoch for run in runs for m in client.get_metric_history(run.info.run_id, "val_nme"))
