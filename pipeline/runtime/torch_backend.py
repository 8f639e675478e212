"""Ray Train's torch set-up, with the rendezvous store on loopback when the workers are.

torch.distributed's TCP rendezvous store (served by rank 0) listens on every interface whatever
address it is given, so on a local Ray, where everything else listens on 127.0.0.1 (see
:mod:`pipeline.runtime.ray_session`), it would be the one port open to the network. When rank 0's
address is a loopback one, every worker is on this machine: rank 0 then serves the store from a
socket it binds to that address itself, and the process group is built on that store. Anywhere
else (a cluster of several machines) Ray Train's own set-up runs unchanged.
"""

from __future__ import annotations

import ipaddress
import socket
from datetime import timedelta
from typing import Any

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig

from pipeline.runtime.ray_internals import torch_backend_parts

_TorchBackend, _set_torch_distributed_env_vars, V1WorkerGroup = torch_backend_parts()

# Rank 0's listening socket, kept from binding (one call) to serving the store (the next).
_LISTENING: dict[str, socket.socket] = {}


def _bind_loopback() -> tuple[str, int]:
    """On rank 0: this node's Ray address and a port bound on it (listening, not yet served)."""
    address = ray.util.get_node_ip_address()
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    listener.bind((address, 0))
    listener.listen()
    _LISTENING["store"] = listener
    return address, listener.getsockname()[1]


def _join_process_group(backend: str, address: str, port: int, world_rank: int, world_size: int,
                        timeout_s: int) -> None:
    """Build the process group on a TCP store served by rank 0 from its loopback socket."""
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        # The store owns the socket from here on (and closes it).
        listen_fd = _LISTENING.pop("store").detach()
        store = dist.TCPStore(address, port, world_size, True, timeout=timeout, master_listen_fd=listen_fd)
    else:
        store = dist.TCPStore(address, port, world_size, False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size,
                            timeout=timeout)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        address = worker_group.execute_single(0, ray.util.get_node_ip_address)
        if not _is_loopback(address) or backend_config.backend not in (None, "gloo", "nccl"):
            super().on_start(worker_group, backend_config)
            return
        uses_gpus = worker_group.get_resources_per_worker().get("GPU", 0) > 0
        backend = backend_config.backend or ("nccl" if uses_gpus else "gloo")
        address, port = worker_group.execute_single(0, _bind_loopback)
        if not isinstance(worker_group, V1WorkerGroup):  # as Ray Train's own set-up does
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, _join_process_group, backend=backend,
                                                   address=address, port=port, world_rank=rank,
                                                   world_size=len(worker_group),
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])


class LoopbackTorchConfig(TorchConfig):
    """:class:`ray.train.torch.TorchConfig` whose store stays on loopback on a local Ray."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _LoopbackTorchBackend
