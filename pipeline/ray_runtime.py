"""Starting Ray for a stage: join the cluster a plain ``ray.init()`` would join, else start a
local one. Every stage starts Ray through :func:`start_ray`."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import ray

LOG = logging.getLogger("frnet.ray")
ADDRESS_VARIABLE = "RAY_ADDRESS"
# Where `ray start` records the cluster it started: RAY_TMPDIR, else TMPDIR, else /tmp, + "/ray".
ADDRESS_RECORD = "ray_current_cluster"


class RayStartError(ValueError):
    """Ray cannot be started as asked (a local-only option while a cluster is running)."""


def cluster_to_join() -> tuple[str, str] | None:
    """The address a plain ``ray.init()`` joins and where it was found, or None to start a local
    Ray: ``RAY_ADDRESS`` (``local`` means start one), else the cluster ``ray start`` recorded on
    this machine."""
    address = os.environ.get(ADDRESS_VARIABLE, "")
    if address:
        return None if address == "local" else (address, ADDRESS_VARIABLE)
    temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    record = Path(temp) / "ray" / ADDRESS_RECORD
    if record.is_file() and (recorded := record.read_text().strip()):
        return recorded, f"`ray start` ({record})"
    return None


def start_ray(num_cpus: int | None = None, dashboard: bool = True, **kwargs: Any) -> None:
    """Join the running cluster, or start a local Ray on ``num_cpus`` CPUs (default: all).

    ``num_cpus`` only sizes a Ray started here: with a cluster to join it is refused with a
    :class:`RayStartError` naming the cluster. A local Ray started with its dashboard tells its
    own processes where that dashboard is: Ray Train's controller queries the state API it serves,
    and with a second Ray on the same machine the lookup of "the" local instance would fail (a
    trial Tune stops early would then keep its workers' CPUs reserved until the sweep ends).
    """
    if ray.is_initialized():
        return
    from pipeline.console import worker_environment

    environment = worker_environment()  # the console's choice, for the job's workers
    cluster = cluster_to_join()
    if cluster is not None:
        address, found_in = cluster
        if num_cpus is not None:
            raise RayStartError(
                f"--num-cpus {num_cpus} sizes a local Ray, but a Ray cluster is running at {address} "
                f"(from {found_in}): leave out --num-cpus to use that cluster, or stop it first")
        LOG.info("joining the Ray cluster at %s (from %s)", address, found_in)
        ray.init(address=address, runtime_env={"env_vars": environment}, **kwargs)
        return
    if not dashboard:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": environment}, **kwargs)
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runtime_env = {"env_vars": {**environment, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
    ray.init(address="local", num_cpus=num_cpus, dashboard_port=port, runtime_env=runtime_env, **kwargs)
