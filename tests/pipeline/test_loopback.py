"""A local Ray listens on loopback only: every TCP listener of the processes a short `frnet train`
starts (GCS, raylet, object manager, dashboard and agents, Prometheus metrics, workers and actors,
and torch.distributed's rendezvous store served by Ray Train's rank 0) is bound to 127.0.0.1 or
::1, never to all interfaces. The store binds every interface unless it is handed a socket, which
:mod:`pipeline.runtime.torch_backend` does; the test sees it among the Train workers' listeners."""


from __future__ import annotations

import ipaddress
import json
import os
import sys
import time

import psutil
import pytest
import yaml

from pipeline.runtime.config import to_plain
from pipeline.runtime.ray_session import cluster_to_join
from pipeline.training.config import DataConfig, RunConfig, ScalingConfig, TrainConfig
from tests.pipeline.cluster_harness import FOREIGN_ENV, session_members, tail

pytestmark = pytest.mark.ray

TRAIN_S = 300
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


def test_a_training_run_listens_on_loopback_only(ray_local, shard_set, processes, tmp_path_factory):
    keeper, _ = processes
    root = tmp_path_factory.mktemp("loopback")
    shards = shard_set
    if cluster_to_join() is None:  # this session's Ray was started here, by start_ray
        session = listeners(descendants({os.getpid()}))
        assert any("raylet" in command for command in session.values()), session
        assert not exposed(session), "this session's Ray, beyond loopback:\n" + "\n".join(exposed(session))
    config = TrainConfig(epochs=1, data=DataConfig(shards=str(shards), batch_size=8, shuffle_buffer=16,
                                                   eval_batch_size=16),
                         scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.4),
                         run=RunConfig(name="loopback", max_failures=0))
    (root / "train.yaml").write_text(yaml.safe_dump(to_plain(config)))
    # RAY_ADDRESS=local: a Ray of its own, whatever `ray start` left on this machine.
    env = {**{k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}, "RAY_ADDRESS": "local"}
    popen, log_path = keeper.start("train", [
        sys.executable, "-m", "pipeline.cli", "train", "--config", str(root / "train.yaml"),
        "--run-dir", str(root / "run"), "--num-cpus", "2", "--json", str(root / "figures.json")], env)

    seen: dict[tuple[str, int], str] = {}
    titles: dict[tuple[str, int], set[str]] = {}
    deadline = time.monotonic() + TRAIN_S
    while popen.poll() is None:
        assert time.monotonic() < deadline, f"frnet train did not finish in {TRAIN_S} s:\n{tail(log_path)}"
        for key, command in listeners(descendants({popen.pid} | session_members({popen.pid}))).items():
            seen.setdefault(key, command)  # as first seen: a process may be gone the next time
            titles.setdefault(key, set()).add(command)  # a Ray worker's title names its task of the moment
        time.sleep(0.3)
    assert popen.returncode == 0, tail(log_path)
    assert json.loads((root / "figures.json").read_text())["best"]["epoch"] == 1

    commands = " ".join(seen.values())
    missing = [name for name in RAY_DAEMONS if name not in commands]
    assert not missing, f"no listener seen of {missing}; seen:\n" + "\n".join(map(str, seen.items()))
    assert sum("ray::" in command for command in seen.values()) >= 3  # agents, workers, the Train actors
    torch_store = [key for key in seen
                   if any(title.startswith(TRAIN_WORKER) or TORCH_SETUP in title for title in titles[key])]
    assert torch_store, "no Ray Train worker listener (the torch store) seen:\n" + "\n".join(map(str, seen))
    assert not exposed(seen), "listening beyond loopback:\n" + "\n".join(exposed(seen))
