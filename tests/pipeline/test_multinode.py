"""A real multi-node run on this machine: a two-node Ray cluster (`ray start --head` plus
`ray start --address`), an MLflow server with a sqlite store, and `ray job submit` of a short
training run whose two workers land on different nodes, log to that server and register a model
that is then pulled back by alias. Everything the test starts, it stops.

How it stays out of other people's way on a shared machine:

- Authentication: `ray start --head` turns token authentication on by itself when
  ~/.ray/auth_token exists, but `ray start --address` does not, so a second node is refused with
  InvalidAuthToken. Rather than disable authentication (the GCS and raylets listen on every
  interface) or depend on ~/.ray, every process of this cluster gets ``RAY_AUTH_MODE=token`` and
  a fresh ``RAY_AUTH_TOKEN``: the nodes, the job CLI, the preprocessing driver.
- Temp dirs: `ray start` records the cluster's address in TEMP_DIR/ray_current_cluster, and a
  plain ``ray.init()`` elsewhere connects to whatever /tmp/ray/ray_current_cluster names. Each
  node gets its own ``--temp-dir`` (see :func:`start_cluster`) and writes the file there, so the
  one in /tmp/ray is never touched; the test checks that it is unchanged afterwards. (`ray stop`
  would reset only /tmp/ray's file, and stop every Ray on the machine: it is never used.) The
  temp dirs are short, under /tmp, because Ray's Unix socket paths live in them. Ray's own code
  that looks the cluster up by itself would read /tmp/ray's file too, hence ``RAY_ADDRESS``.
- Ports: every port Ray would otherwise take from a fixed default (GCS 6379, dashboard 8265,
  client server 10001, dashboard agent 52365, ...) is a free one found by binding to port 0.
  Ray swaps 127.0.0.1 for this machine's routable address when it registers a node (a cluster
  of loopback nodes is refused); the clients here all use 127.0.0.1.
- Processes: each command starts in a session of its own. The daemons `ray start` leaves behind
  stay in its session (the raylet gives each worker its own process group, not a new session);
  the job supervisor runs the job's driver in a new session, found as a descendant. Teardown
  sends SIGTERM, then SIGKILL, to exactly those processes and fails if any is left.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from models.checkpoint import load_bundle
from pipeline.tracking import bundle_from_model_uri
from preprocessing.synth import SynthConfig, generate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds its processes through /proc"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
# The virtualenv's own commands (not resolved: the venv's python is a symlink to the base one).
VENV_BIN = Path(sys.executable).parent
TEST_BOUND_S = 420  # the whole test, a hang included (it takes about 2 minutes on 2 cores)
CLUSTER_UP_S = 120
MLFLOW_UP_S = 60
STOP_GRACE_S = 10
MODEL_NAME = "frnet-multinode"
# Logical CPUs. Ray Data's read and decode tasks take a whole CPU each by default; with 1 CPU per
# node, the 0.4 CPU of a worker on each left no node a whole one, and the run hung ("Cluster
# resources are not enough to run any task from TaskPoolMapOperator[ReadFilesParquetV2]").
# The head keeps a CPU for them; the workers are kept apart by placement, not by CPU counts.
HEAD_CPUS = 2
NODE_CPUS = 1
# Environment variables of the caller that would point this test's processes elsewhere.
FOREIGN_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
               "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


class Deadline:
    """A time bound; each wait under it takes the smaller of its own cap and what is left."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = seconds, what
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"{self.what}: not done within {self.seconds:.0f} s")
        return remaining if cap is None else min(cap, remaining)

    def within(self, seconds: float, what: str) -> Deadline:
        """A bound for one stage: ``seconds`` or what is left of this one, if less."""
        return Deadline(self.left(seconds), what)


# -- processes --------------------------------------------------------------------------------

def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, state letter) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        state, ppid, _pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
        table[int(entry)] = (int(ppid), int(session), state)
    return table


def session_members(sessions: set[int]) -> set[int]:
    """Live processes in ``sessions``, their descendants, and the sessions those descendants
    opened (a Ray job's driver runs in a new session under the job supervisor)."""
    table = process_table()
    own = {os.getpid(), os.getsid(0)}
    sessions = set(sessions) - own
    found: set[int] = set()
    while True:
        grown = {pid for pid, (ppid, session, state) in table.items()
                 if state != "Z" and (session in sessions or ppid in found)} - own
        sessions |= {table[pid][1] for pid in grown} - own
        if grown == found:
            return found
        found = grown


def describe(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        command = "?"
    return f"{pid}: {command[:160]}"


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"({path} unreadable)"


class Processes:
    """The commands this test runs, each in a session of its own, and what they leave behind."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.sessions: set[int] = set()
        self.popens: list[subprocess.Popen] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        """Start ``command`` with its output in LOG_DIR/NAME.log (a file, not a pipe: daemons
        that inherit a pipe would keep it open after the command exits)."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.sessions.add(popen.pid)
        self.popens.append(popen)
        return popen, log_path

    def run(self, name: str, command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
        """Run ``command`` to its end within ``timeout`` seconds: (exit status, output)."""
        popen, log_path = self.start(name, command, env)
        try:
            returncode = popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(command[:4])} ...` did not finish in {timeout:.0f} s:\n{tail(log_path)}")
        self.forget_if_empty(popen.pid)
        return returncode, log_path.read_text(errors="replace")

    def forget_if_empty(self, session: int) -> None:
        """Drop a session nothing runs in any more: its id is a pid, and pids are reused (often
        within minutes where pid_max is 32768), so a stale one could later name a stranger's."""
        if not session_members({session}):
            self.sessions.discard(session)

    def stop(self, sessions: set[int] | None = None) -> list[str]:
        """SIGTERM, then SIGKILL, every process of ``sessions`` (default: all of this test's);
        returns any left."""
        sessions = self.sessions if sessions is None else sessions
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in session_members(sessions):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + STOP_GRACE_S
            while session_members(sessions) and time.monotonic() < end:
                time.sleep(0.2)
        for popen in self.popens:  # reap the direct children
            if popen.pid in sessions:
                try:
                    popen.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
        return [describe(pid) for pid in sorted(session_members(sessions))]


# -- the cluster and the server ---------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on every interface right now (all sockets held until all are
    chosen, so none is handed out twice)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def node_ports(ports: Iterator[int]) -> list[str]:
    """The `ray start` options of the ports every node opens."""
    return ["--node-manager-port", str(next(ports)), "--object-manager-port", str(next(ports)),
            "--dashboard-agent-listen-port", str(next(ports)),
            "--dashboard-agent-grpc-port", str(next(ports)),
            "--runtime-env-agent-port", str(next(ports)), "--metrics-export-port", str(next(ports))]


@dataclass(frozen=True)
class Cluster:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]  # for every process of and client to this cluster (its token)
    node_ids: frozenset[str]


def ray_cli(processes: Processes, cluster_env: dict[str, str], name: str, args: list[str],
            timeout: float) -> tuple[int, str]:
    return processes.run(name, [str(VENV_BIN / "ray"), *args], cluster_env, timeout)


def alive_nodes(processes: Processes, env: dict[str, str], dashboard_url: str,
                timeout: float) -> list[dict]:
    status, output = ray_cli(processes, env, "list-nodes",
                             ["list", "nodes", "--address", dashboard_url, "--format", "json"], timeout)
    if status != 0:
        return []
    start = output.find("[")
    try:
        nodes = json.loads(output[start:]) if start >= 0 else []
    except ValueError:
        return []
    return [node for node in nodes if node["state"] == "ALIVE"]


def start_node(processes: Processes, name: str, args: list[str], env: dict[str, str],
               up_by: Deadline) -> bool:
    """`ray start ARGS`; on failure its processes are stopped again. On a loaded machine a node
    can miss Ray's fixed 30 s wait for its raylet to register, so callers try again."""
    popen, log_path = processes.start(name, [str(VENV_BIN / "ray"), "start", *args], env)
    try:
        popen.wait(timeout=up_by.left())
    except subprocess.TimeoutExpired:
        pytest.fail(f"{up_by.what}: `ray start` did not return within {up_by.seconds:.0f} s:\n"
                    f"{tail(log_path)}")
    if popen.returncode != 0:
        processes.stop({popen.pid})
        processes.forget_if_empty(popen.pid)
    return popen.returncode == 0


def start_cluster(processes: Processes, temp_dir: Path, env: dict[str, str],
                  deadline: Deadline) -> Cluster:
    """A head and a second node on this machine, each with its own temp dir under ``temp_dir``:
    a node's temp dir is node-local state (its runtime environments, sockets and logs), and two
    nodes sharing one delete each other's copy of a job's working directory."""
    up_by = deadline.within(CLUSTER_UP_S, "starting the two-node cluster")
    # A job's entrypoint `python` is looked up on the node's PATH (Ray does not put its own
    # interpreter there): the venv's bin first, as if `ray start` ran in the activated venv.
    env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])}
    common = ["--node-ip-address", "127.0.0.1", "--object-store-memory", str(200 * 2**20),
              "--disable-usage-stats"]
    for attempt in itertools.count():
        ports = iter(free_ports(9))
        gcs_port, dashboard_port, client_port = next(ports), next(ports), next(ports)
        # Every process of the cluster inherits RAY_ADDRESS. Without it, code in Ray's workers
        # that finds "its" cluster on its own (Train's placement-group cleaner asks the state
        # API) reads /tmp/ray/ray_current_cluster, not this cluster's, then falls back to
        # looking for a single gcs_server on the machine, and fails when others run Ray too.
        node_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}
        if start_node(processes, f"ray-start-head-{attempt}", [
            "--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port),
            "--num-cpus", str(HEAD_CPUS), "--temp-dir", str(temp_dir / "head"), *node_ports(ports), *common,
        ], node_env, up_by):
            break
    gcs_address = node_env["RAY_ADDRESS"]
    for attempt in itertools.count():
        if start_node(processes, f"ray-start-node-{attempt}", [
            "--address", gcs_address, "--num-cpus", str(NODE_CPUS), "--temp-dir", str(temp_dir / "node"),
            *node_ports(iter(free_ports(6))), *common,
        ], node_env, up_by):
            break
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    # Exactly two: a node of a failed attempt stays ALIVE until the GCS misses its heartbeats.
    while len(nodes := alive_nodes(processes, node_env, dashboard_url, up_by.left())) != 2:
        time.sleep(1)
    return Cluster(gcs_address, dashboard_url, node_env, frozenset(node["node_id"] for node in nodes))


def wait_for_mlflow(server: subprocess.Popen, log_path: Path, uri: str, deadline: Deadline) -> None:
    up_by = deadline.within(MLFLOW_UP_S, "waiting for the mlflow server's /health")
    while True:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > up_by.end:
            pytest.fail(f"{up_by.what}: no answer within {up_by.seconds:.0f} s:\n{tail(log_path)}")
        time.sleep(0.5)


def default_address_file() -> Path:
    """Where a plain ``ray.init()`` looks for the latest cluster (Ray's own rule)."""
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(root) / "ray" / "ray_current_cluster"


def read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[tuple[Processes, Path]]:
    """The test's processes and a Ray temp dir; afterwards nothing of them is left running and
    the machine's default ray_current_cluster is as it was."""
    address_file = default_address_file()
    before = read_or_none(address_file)
    temp_dir = Path(tempfile.mkdtemp(prefix="frnet-ray-", dir="/tmp"))
    keeper = Processes(tmp_path / "logs")
    try:
        yield keeper, temp_dir
    finally:
        left = keeper.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, "still running after teardown:\n" + "\n".join(left)
    assert read_or_none(address_file) == before, f"{address_file} was changed"


# -- the test ---------------------------------------------------------------------------------

def make_shards(processes: Processes, cluster: Cluster, root: Path, deadline: Deadline) -> Path:
    """Tiny synthetic 300W-LP and AFLW2000-3D folders, preprocessed by a driver on the cluster."""
    generate(SynthConfig("300w-lp", n=8, seed=31, views_per_face=4), root / "300W_LP")
    generate(SynthConfig("aflw2000-3d", n=4, seed=32), root / "AFLW2000")
    config_path = root / "preprocess.yaml"
    config_path.write_text(yaml.safe_dump({"val_fraction": 0.3, "augment": {"copies": 2}}))
    status, output = processes.run("preprocess", [
        sys.executable, "-m", "pipeline.cli", "preprocess", "--input", str(root / "300W_LP"),
        "--output", str(root / "shards"), "--aflw2000", str(root / "AFLW2000"), "--config", str(config_path),
    ], cluster.env, deadline.left(180))
    assert status == 0, f"preprocessing on the cluster failed:\n{output[-3000:]}"
    return root / "shards"


def train_config(shards: Path, storage: Path, tracking_uri: str) -> dict:
    return {
        "epochs": 2,
        "data": {"shards": str(shards), "batch_size": 8, "shuffle_buffer": 16, "eval_batch_size": 16},
        # STRICT_SPREAD, not SPREAD: one worker per node is what this test is about, so it is a
        # requirement Ray must meet, not a preference it may drop when a node looks busy (both
        # workers would fit on the head). 0.4 CPU each leaves the head a CPU for Ray Data.
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.4, "placement_strategy": "STRICT_SPREAD"},
        # One machine, so a local folder stands for the shared storage a real cluster needs.
        "run": {"name": "multinode", "storage_path": str(storage), "max_failures": 0},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "multinode", "registered_model": MODEL_NAME},
    }


def submit_training(processes: Processes, cluster: Cluster, config_path: Path, run_dir: Path,
                    figures_path: Path, deadline: Deadline) -> None:
    """`ray job submit` of pipeline/train.py with this checkout as the working directory. The
    entrypoint's `python` is the venv's through the nodes' PATH (see :func:`start_cluster`)."""
    submission_id = f"frnet-multinode-{secrets.token_hex(4)}"
    excludes = [".venv", ".git", "runs", "data", "**/__pycache__", ".pytest_cache", ".ruff_cache"]
    status, output = processes.run("job-submit", [
        str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
        "--submission-id", submission_id, "--working-dir", str(REPO_ROOT),
        "--runtime-env-json", json.dumps({"excludes": excludes}),
        "--", "python", "pipeline/train.py", "--config", str(config_path), "--run-dir", str(run_dir),
        "--json", str(figures_path),
    ], cluster.env, deadline.left())
    if status != 0 or not figures_path.exists():
        _, logs = ray_cli(processes, cluster.env, "job-logs",
                          ["job", "logs", "--address", cluster.dashboard_url, submission_id], 60)
        pytest.fail(f"the training job {submission_id} failed (ray job submit: {status}); "
                    f"ray job logs:\n{logs[-6000:]}")


def test_training_job_on_two_nodes_registers_a_model(processes, tmp_path):
    keeper, temp_dir = processes
    deadline = Deadline(TEST_BOUND_S, "the multi-node test")
    env = {key: value for key, value in os.environ.items() if key not in FOREIGN_ENV}

    # The MLflow server starts while the cluster does (a second or two of CPU each).
    (mlflow_port,) = free_ports(1)
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    server, server_log = keeper.start("mlflow-server", [
        str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination", str(tmp_path / "mlartifacts"), "--host", "127.0.0.1",
        "--port", str(mlflow_port), "--workers", "1"], env)
    cluster = start_cluster(keeper, temp_dir, env, deadline)
    gcs_port = cluster.gcs_address.rpartition(":")[2]
    assert (temp_dir / "head" / "ray_current_cluster").read_text().strip().endswith(f":{gcs_port}")
    wait_for_mlflow(server, server_log, tracking_uri, deadline)

    shards = make_shards(keeper, cluster, tmp_path / "data", deadline)
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(train_config(shards, tmp_path / "ray-storage", tracking_uri)))
    figures_path = tmp_path / "figures.json"
    submit_training(keeper, cluster, config_path, tmp_path / "run", figures_path, deadline)
    figures = json.loads(figures_path.read_text())

    # The two workers ran on the two nodes of this cluster.
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(figures["run_id"])
    worker_nodes = run.data.tags["train.node_ids"].split(",")
    assert len(worker_nodes) == 2 and set(worker_nodes) == cluster.node_ids, (worker_nodes, cluster.node_ids)
    assert [m.step for m in client.get_metric_history(figures["run_id"], "val_nme")] == [1, 2]

    # Registered as the champion on the server; pulled back by alias, it computes what the model
    # file the job wrote computes, and so does the model file logged beside it.
    assert figures["champion"]
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == figures["model_version"]
    bundle, _ = load_bundle(figures["model_file"])
    inputs = torch.randn(2, 3, 120, 120, generator=torch.Generator().manual_seed(0))
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")  # mlflow keeps the two in step
    mlflow.set_tracking_uri(tracking_uri)
    try:
        by_alias = mlflow.pytorch.load_model(f"models:/{MODEL_NAME}@champion")
        fetched = bundle_from_model_uri(f"models:/{MODEL_NAME}@champion", tracking_uri)
    finally:
        mlflow.set_tracking_uri(previous_uri)
    with torch.no_grad():
        expected = bundle.build_network().eval()(inputs).numpy()
        np.testing.assert_allclose(by_alias.eval()(inputs).numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(fetched.build_network().eval()(inputs).numpy(), expected, atol=1e-5)
