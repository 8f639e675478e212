"""A `frnet train` run watched from outside, with a Ray of its own (as at a terminal):

- Loopback only: every TCP listener of the processes it starts (GCS, raylet, object manager,
  dashboard and agents, Prometheus metrics, workers and actors, and torch.distributed's
  rendezvous store served by Ray Train's rank 0) is bound to 127.0.0.1 or ::1, never to all
  interfaces. The store binds every interface unless it is handed a socket, which
  :mod:`pipeline.runtime.torch_backend` does; the test sees it among the Train workers' listeners.
- A lost worker: one Ray Train worker is SIGKILLed after the first registered checkpoint; with
  run.max_failures the run restarts its workers from the latest checkpoint and finishes every
  epoch once.

One run serves both (its set-up is the costly part); each has its own test.
"""


from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from pipeline.runtime.ray_session import cluster_to_join
from tests.pipeline.cluster_harness import FOREIGN_ENV, Processes, session_members, tail

pytestmark = pytest.mark.ray

TRAIN_S = 420
EPOCHS = 4
# Processes of a Ray node: seeing each of these proves the listing saw Ray, not only the driver.
# A Ray Train worker, by its process title: idle, or joining the torch process group.
TRAIN_WORKER = "ray::RayTrainWorker"
TORCH_SETUP = "_join_process_group"
RAY_DAEMONS = ("gcs_server", "raylet", "dashboard.py", "DashboardAgent", "RuntimeEnvAgent")


def is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def listeners(pids: set[int]) -> dict[tuple[str, int], str]:
    """(address, port) -> the command line of the process of ``pids`` listening there."""
    found = {}
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status != psutil.CONN_LISTEN or connection.pid not in pids:
            continue
        try:
            command = " ".join(psutil.Process(connection.pid).cmdline())
        except psutil.Error:
            continue  # gone between the two calls
        found[(connection.laddr.ip, connection.laddr.port)] = command
    return found


def descendants(pids: set[int]) -> set[int]:
    found = set(pids)
    for pid in pids:
        try:
            found |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            pass
    return found


def exposed(seen: dict[tuple[str, int], str]) -> list[str]:
    return [f"{host}:{port}  {command[:160]}" for (host, port), command in sorted(seen.items())
            if not is_loopback(host)]


def command_line(pid: int) -> str:
    """A process's command line, or "" for one that exited (Ray's short-lived helpers do)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def registered_epochs(snapshot: Path) -> list[int]:
    """Epochs whose checkpoints Ray Train has registered (a checkpoint folder alone may not be)."""
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []
    return [int(r["metrics"]["epoch"]) for r in results]


@dataclass
class WatchedRun:
    returncode: int
    output: str
    figures: dict
    listeners: dict[tuple[str, int], str]  # as first seen
    titles: dict[tuple[str, int], set[str]]  # every title seen: a Ray worker's names its task
    done_before_kill: int
    killed: str  # the killed worker's command line


@pytest.fixture(scope="module")
def watched_run(shard_set, tmp_path_factory) -> WatchedRun:
    root = tmp_path_factory.mktemp("watched-run")
    keeper = Processes(root / "logs")
    (root / "train.yaml").write_text(yaml.safe_dump({
        "epochs": EPOCHS,
        "data": {"shards": str(shard_set), "batch_size": 8, "shuffle_buffer": 16, "eval_batch_size": 16},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.4},
        "run": {"name": "watched", "max_failures": 2},
    }))
    run_dir = root / "run"
    # RAY_ADDRESS=local: a Ray of its own, whatever `ray start` left on this machine.
    env = {**{k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}, "RAY_ADDRESS": "local"}
    try:
        popen, log_path = keeper.start("train", [
            sys.executable, "-m", "pipeline.cli", "train", "--config", str(root / "train.yaml"),
            "--run-dir", str(run_dir), "--num-cpus", "2", "--json", str(root / "figures.json")], env)
        snapshot = run_dir / "ray" / "watched" / "checkpoint_manager_snapshot.json"
        seen: dict[tuple[str, int], str] = {}
        titles: dict[tuple[str, int], set[str]] = {}
        done_before_kill, killed = 0, ""
        deadline = time.monotonic() + TRAIN_S
        scanned = 0.0
        while popen.poll() is None:
            assert time.monotonic() < deadline, f"not finished in {TRAIN_S} s:\n{tail(log_path)}"
            members = descendants({popen.pid} | session_members({popen.pid}))
            # Listing the machine's sockets costs tens of milliseconds of CPU: once a second is
            # enough to see the listeners, which live as long as their processes.
            if time.monotonic() - scanned >= 1.0:
                scanned = time.monotonic()
                for key, command in listeners(members).items():
                    seen.setdefault(key, command)  # as first seen: a process may be gone the next time
                    titles.setdefault(key, set()).add(command)
            if not killed and (done := registered_epochs(snapshot)):
                workers = [pid for pid in members if "RayTrainWorker" in command_line(pid)]
                assert workers, "no Ray Train worker process found"
                done_before_kill, killed = max(done), command_line(max(workers))
                os.kill(max(workers), signal.SIGKILL)
            time.sleep(0.2 if not killed else 0.5)
        figures_path = root / "figures.json"
        return WatchedRun(popen.returncode, log_path.read_text(errors="replace"),
                          json.loads(figures_path.read_text()) if figures_path.exists() else {},
                          seen, titles, done_before_kill, killed)
    finally:
        left = keeper.stop()
        assert not left, "still running after the run:\n" + "\n".join(left)


def test_the_session_ray_listens_on_loopback_only(ray_local):
    if cluster_to_join() is not None:
        pytest.skip("this session joined a Ray started elsewhere: its listeners are not this test's")
    session = listeners(descendants({os.getpid()}))
    assert any("raylet" in command for command in session.values()), session
    assert not exposed(session), "this session's Ray, beyond loopback:\n" + "\n".join(exposed(session))


def test_a_training_run_listens_on_loopback_only(watched_run):
    assert watched_run.returncode == 0, watched_run.output[-3000:]
    seen, titles = watched_run.listeners, watched_run.titles
    commands = " ".join(seen.values())
    missing = [name for name in RAY_DAEMONS if name not in commands]
    assert not missing, f"no listener seen of {missing}; seen:\n" + "\n".join(map(str, seen.items()))
    assert sum("ray::" in command for command in seen.values()) >= 3  # agents, workers, the Train actors
    torch_store = [key for key in seen
                   if any(title.startswith(TRAIN_WORKER) or TORCH_SETUP in title for title in titles[key])]
    assert torch_store, "no Ray Train worker listener (the torch store) seen:\n" + "\n".join(map(str, seen))
    assert not exposed(seen), "listening beyond loopback:\n" + "\n".join(exposed(seen))


def test_a_killed_worker_is_replaced_and_no_finished_epoch_is_lost(watched_run):
    assert "RayTrainWorker" in watched_run.killed
    assert 1 <= watched_run.done_before_kill < EPOCHS, "the kill must land mid-run, after a checkpoint"
    assert watched_run.returncode == 0, watched_run.output[-3000:]
    resumed = [int(n) for n in re.findall(r"resumed from the checkpoint of epoch (\d+)", watched_run.output)]
    assert resumed and resumed[0] >= watched_run.done_before_kill  # no registered epoch trained again
    figures = watched_run.figures
    client = mlflow.MlflowClient(figures["tracking_uri"])
    steps = sorted(m.step for m in client.get_metric_history(figures["run_id"], "val_nme"))
    assert steps == list(range(1, EPOCHS + 1))  # every epoch once
