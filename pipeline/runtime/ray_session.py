"""Starting Ray for a stage: join the cluster a plain ``ray.init()`` would join, else start a
local one, reachable from this machine only. Every stage starts Ray through :func:`start_ray`."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import ray

from pipeline.runtime.ray_internals import clusters_switched_off, job_environment

LOG = logging.getLogger("frnet.ray")
ADDRESS_VARIABLE = "RAY_ADDRESS"
# Where `ray start` records the cluster it started: RAY_TMPDIR, else TMPDIR, else /tmp, + "/ray".
ADDRESS_RECORD = "ray_current_cluster"
LOOPBACK = "127.0.0.1"


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


def check_num_cpus(num_cpus: int | None) -> None:
    """Refuse (RayStartError) ``num_cpus`` where :func:`start_ray` would join a cluster: it only
    sizes a Ray started here. Every stage checks it first, before reading anything else."""
    cluster = cluster_to_join()
    if cluster is not None and num_cpus is not None:
        address, found_in = cluster
        raise RayStartError(
            f"--num-cpus {num_cpus} sizes a local Ray, but a Ray cluster is running at {address} "
            f"(from {found_in}): leave out --num-cpus to use that cluster, or stop it first")


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
    from pipeline.runtime.console import quiet_forwarded_lines, worker_environment
    from pipeline.runtime.paths import storage_environment

    # The workers keep the console's choice and reach the driver's S3 endpoint with its keys.
    init_ray(num_cpus, dashboard, worker_environment() | storage_environment(), kwargs)
    quiet_forwarded_lines()


def init_ray(num_cpus: int | None, dashboard: bool, environment: dict[str, str],
             kwargs: dict[str, Any]) -> None:
    """``ray.init`` as :func:`start_ray` describes, the workers handed ``environment``."""
    check_num_cpus(num_cpus)
    cluster = cluster_to_join()
    if cluster is not None:
        address, found_in = cluster
        LOG.info("joining the Ray cluster at %s (from %s)", address, found_in)
        # What the job (ray job submit) hands its workers already is theirs; asking again is refused.
        given = job_environment()
        environment = {name: value for name, value in environment.items() if name not in given}
        ray.init(address=address, runtime_env={"env_vars": environment}, **kwargs)
        return
    if not dashboard:
        init_on_loopback(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": environment},
                         **kwargs)
        return
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    runtime_env = {"env_vars": {**environment, "RAY_API_SERVER_ADDRESS": f"http://{LOOPBACK}:{port}"}}
    init_on_loopback(num_cpus=num_cpus, dashboard_host=LOOPBACK, dashboard_port=port, runtime_env=runtime_env,
                     **kwargs)


def init_on_loopback(**kwargs: Any) -> None:
    """``ray.init`` of a local Ray whose every listener (GCS, raylet, object manager, workers,
    dashboard and its agent, the runtime-env agent, the Prometheus metrics endpoints) binds to
    127.0.0.1, not to all interfaces.

    Ray 2.60 binds them to loopback only when the node address is loopback (to every interface
    otherwise), and on Linux it replaces a loopback node address
    (``_node_ip_address="127.0.0.1"``) by the machine's outward one
    (``ray._private.services.resolve_ip_for_localhost``) unless clusters are switched off, as they
    are on macOS and Windows: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once when ray is
    imported (:func:`pipeline.runtime.ray_internals.clusters_switched_off`). So the switch is
    turned off for the start only: the processes Ray starts are handed the address, and a later
    join of a real cluster from this process finds its own outward address again.
    """
    with clusters_switched_off():
        ray.init(address="local", **kwargs)
    node_address = ray.util.get_node_ip_address()
    if node_address != LOOPBACK:
        ray.shutdown()
        raise RayStartError(f"the local Ray listens on {node_address}, not {LOOPBACK}: this Ray "
                            f"({ray.__version__}) no longer takes the loopback switch; pin ray==2.60.0")
