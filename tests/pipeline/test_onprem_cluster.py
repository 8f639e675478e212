"""cluster-onprem.yaml brought up for real: `ray up` over SSH to a loopback address, `ray submit`
of preprocessing and training with config paths relative to the checkout, the registered model
and its `champion` alias, and `ray down`. The sandbox that keeps `ray stop` and Ray's fixed ports
away from everything else: :mod:`tests.pipeline.launcher_harness`.

The test changes only what names machines and how they are set up: the head is 127.0.0.3, no
workers, its SSH user is the sandbox's, and its set-up commands use the environment this test
runs in (with the copied checkout first on the path) instead of building a virtualenv. File
mounts, excludes, start commands, `ray submit` and `ray down` are the shipped file's.
"""

from __future__ import annotations

import json
import shutil

import jsonschema
import mlflow
import pytest
import yaml

from preprocessing.synth import SynthConfig, generate
from tests.pipeline import launcher_harness
from tests.pipeline.cluster_harness import REPO_ROOT, VENV_BIN, Deadline
from tests.pipeline.test_cluster_yaml import SCHEMA_PATH

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(launcher_harness.missing() is not None,
                       reason=f"the cluster launcher test {launcher_harness.missing()}"),
]

TEST_BOUND_S = 600  # about 2 minutes on 2 cores
CLUSTER_FILE = "cluster-onprem.yaml"
# What `rsync_exclude` keeps off the nodes; the copy leaves it out too.
NOT_COPIED = (".venv", ".git", "runs", "data", "mlruns", "mlartifacts", "__pycache__", ".pytest_cache",
              ".ruff_cache", "*.egg-info")


def test_cluster_file():
    """Valid for `ray up`, with what a user edits all there and nothing big riding along."""
    cluster = yaml.safe_load((REPO_ROOT / CLUSTER_FILE).read_text())
    jsonschema.validate(cluster, json.loads(SCHEMA_PATH.read_text()))
    assert cluster["provider"]["type"] == "local"
    assert {"head_ip", "worker_ips"} <= set(cluster["provider"])
    assert {"ssh_user", "ssh_private_key"} <= set(cluster["auth"])
    assert {".venv", ".git", "/runs/", "/data/"} <= set(cluster["rsync_exclude"])
    assert "available_node_types" not in cluster  # the local provider makes its own


def launcher_cluster_file(checkout, sandbox) -> None:
    """The shipped file, pointed at the sandbox's head and this test's environment."""
    cluster = yaml.safe_load((REPO_ROOT / CLUSTER_FILE).read_text())
    cluster["provider"].update(head_ip=launcher_harness.SSH_HOST, worker_ips=[])
    cluster["auth"] = {"ssh_user": launcher_harness.SSH_USER, "ssh_private_key": str(sandbox.key)}
    cluster["setup_commands"] = [
        f"echo 'source {VENV_BIN / 'activate'}; export PYTHONPATH=~/mobile-frnet' > ~/.bashrc"]
    (checkout / CLUSTER_FILE).write_text(yaml.safe_dump(cluster))


def test_ray_up_submit_down_on_premises(processes, tmp_path):
    keeper, _ = processes
    deadline = Deadline(TEST_BOUND_S, "the on-premises cluster test")
    sandbox = launcher_harness.start_sandbox(keeper, tmp_path, deadline)

    # A user's checkout with their configs in it (the data live on storage the head mounts).
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT, checkout, ignore=shutil.ignore_patterns(*NOT_COPIED))
    data = tmp_path / "data"
    generate(SynthConfig("300w-lp", n=8, seed=51, views_per_face=4), data / "300W_LP")
    generate(SynthConfig("aflw2000-3d", n=4, seed=52), data / "AFLW2000")
    configs = checkout / "configs" / "onprem"
    configs.mkdir()
    (configs / "preprocess.yaml").write_text(yaml.safe_dump({"val_fraction": 0.3, "augment": {"copies": 2}}))
    (configs / "train.yaml").write_text(yaml.safe_dump({
        "epochs": 2,
        "data": {"shards": str(data / "shards"), "batch_size": 8, "shuffle_buffer": 16,
                 "eval_batch_size": 16},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.4},
        "run": {"name": "onprem", "max_failures": 0},
        "mlflow": {"experiment": "onprem", "registered_model": "frnet-onprem"}}))
    launcher_cluster_file(checkout, sandbox)

    def ray(name: str, *args: str, bound: float = 240) -> str:
        status, output = sandbox.ray(keeper, name, [*args], checkout, deadline.left(bound))
        assert status == 0, f"`ray {' '.join(args)}` exited with {status}:\n{output[-4000:]}"
        return output

    home = sandbox.home
    ray("up", "up", "-y", CLUSTER_FILE, "--disable-usage-stats", "--log-style", "record")
    try:
        # A path found neither in the head's home folder nor in the checkout: both are named.
        status, output = sandbox.ray(keeper, "submit-missing", [
            "submit", CLUSTER_FILE, "pipeline/train.py", "--log-style", "record", "--",
            "--config", "configs/onprem/missing.yaml"], checkout, deadline.left(120))
        assert status != 0
        assert (f"--config configs/onprem/missing.yaml: not found (tried {home}/configs/onprem/missing.yaml "
                f"or {home}/mobile-frnet/configs/onprem/missing.yaml)") in output, output[-3000:]
        assert "Traceback" not in output

        ray("submit-preprocess", "submit", CLUSTER_FILE, "pipeline/preprocess.py", "--log-style", "record",
            "--", "--config", "configs/onprem/preprocess.yaml", "--input", str(data / "300W_LP"),
            "--aflw2000", str(data / "AFLW2000"), "--output", str(data / "shards"))
        ray("submit-train", "submit", CLUSTER_FILE, "pipeline/train.py", "--log-style", "record",
            "--", "--config", "configs/onprem/train.yaml", "--json", "train.json")
    finally:
        ray("down", "down", "-y", CLUSTER_FILE, "--log-style", "record", bound=120)

    # The stage ran from the head's home folder: its outputs and the default store are there.
    figures = json.loads((home / "train.json").read_text())
    store = f"sqlite:///{home / 'runs' / 'default' / 'mlflow.db'}"
    assert figures["tracking_uri"] == store
    client = mlflow.MlflowClient(store)
    assert [m.step for m in client.get_metric_history(figures["run_id"], "val_nme")] == [1, 2]
    assert figures["champion"]
    champion = client.get_model_version_by_alias("frnet-onprem", "champion")
    assert str(champion.version) == figures["model_version"] and champion.run_id == figures["run_id"]
    # `ray down` stopped Ray on the head: only the sandbox's init, sshd and the launcher's SSH
    # connections are left in it.
    status, output = keeper.run("sandbox-ps", sandbox.command(["ps", "-e", "-o", "comm="], tmp_path),
                                sandbox.env, 30)
    assert status == 0 and not {"raylet", "gcs_server"} & set(output.split()), output
