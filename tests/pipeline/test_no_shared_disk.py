"""Two nodes that do not share the head's disk: the second node runs in a mount namespace in
which the head's run directory (and its Ray temp dir) are empty; one folder both see stands for
NFS. Preprocessing, training and a sweep run on both nodes with their shared data there, while
the MLflow store is the default sqlite file on the head; a folder only the head sees is refused
before any work, in one line. Cluster set-up: :mod:`tests.pipeline.cluster_harness`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from preprocessing.synth import SynthConfig, generate
from tests.pipeline.cluster_harness import FOREIGN_ENV, Cluster, Deadline, Processes, start_cluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux mount namespaces"),
    pytest.mark.skipif(os.geteuid() != 0, reason="hiding folders from a node needs root (unshare --mount)"),
]

TEST_BOUND_S = 900
MODEL_NAME = "frnet-no-shared-disk"
REFUSAL = "use a folder every node mounts (NFS) or an s3:// URI"


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
    cluster = start_cluster(keeper, temp_dir, env, deadline, hide=[head_only])
    assert len(cluster.node_ids) == 2

    # Preprocessing: shards on the head's disk alone are refused before any shard is written.
    preprocess = ["preprocess", "--input", str(nfs / "300W_LP"), "--aflw2000", str(nfs / "AFLW2000"),
                  "--config", str(nfs / "preprocess.yaml")]
    status, output = stage(keeper, cluster, "preprocess-head-only",
                           [*preprocess, "--output", str(head_only / "shards")], deadline)
    lines = refusal_lines(output)
    assert status == 1 and len(lines) == 1 and "--output" in lines[0], output[-3000:]
    assert "Traceback" not in output
    assert not (head_only / "shards" / "manifest.json").exists()
    status, output = stage(keeper, cluster, "preprocess", [*preprocess, "--output", str(nfs / "shards")],
                           deadline)
    assert status == 0, output[-3000:]

    # Training: checkpoints on the head's disk (the empty storage_path's default) are refused.
    head_config = head_only / "train-head-storage.yaml"
    head_config.write_text(yaml.safe_dump(training_config(nfs / "shards", "")))
    status, output = stage(keeper, cluster, "train-head-storage",
                           ["train", "--config", str(head_config), "--run-dir", str(run_dir)], deadline)
    lines = refusal_lines(output)
    assert status == 1 and len(lines) == 1 and "run.storage_path (empty: RUN_DIR/ray)" in lines[0], \
        output[-3000:]
    assert "Traceback" not in output

    config = nfs / "train.yaml"
    config.write_text(yaml.safe_dump(training_config(nfs / "shards", str(nfs / "ray-storage"))))
    status, output = stage(keeper, cluster, "train", ["train", "--config", str(config), "--run-dir",
                                                      str(run_dir), "--json", str(head_only / "train.json")],
                           deadline)
    assert status == 0, output[-3000:]
    figures = json.loads((head_only / "train.json").read_text())
    store = f"sqlite:///{run_dir / 'mlflow.db'}"
    assert figures["tracking_uri"] == store and figures["champion"]
    client = mlflow.MlflowClient(store)
    assert set(client.get_run(figures["run_id"]).data.tags["train.node_ids"].split(",")) == cluster.node_ids
    assert [m.step for m in client.get_metric_history(figures["run_id"], "val_nme")] == [1, 2]
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == figures["model_version"]

    # A sweep of two trials, each training on both nodes, logged to the same store on the head.
    (nfs / "tune.yaml").write_text(yaml.safe_dump({
        "name": "no-shared-disk-sweep", "train_config": "train.yaml", "epochs": 1,
        "trial": {"num_workers": 2, "cpus_per_worker": 0.4}, "storage_path": str(nfs / "tune-storage"),
        "register": False}))
    (nfs / "space.yaml").write_text(yaml.safe_dump({
        "num_samples": 2, "searcher": {"name": "random", "seed": 0}, "scheduler": {"name": "fifo"},
        "space": {"loss.lambda2": {"distribution": "choice", "values": [0.05, 0.1]}}}))
    status, output = stage(keeper, cluster, "tune", ["tune", "--config", str(nfs / "tune.yaml"), "--space",
                                                     str(nfs / "space.yaml"), "--run-dir", str(run_dir),
                                                     "--json", str(head_only / "tune.json")], deadline)
    assert status == 0, output[-3000:]
    sweep = json.loads((head_only / "tune.json").read_text())
    assert [trial["state"] for trial in sweep["trials"]] == ["completed", "completed"], sweep["trials"]
    for trial in sweep["trials"]:
        run = client.get_run(trial["mlflow_run_id"])
        assert set(run.data.tags["train.node_ids"].split(",")) == cluster.node_ids
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_nme")] == [1]
