"""The private parts of Ray the project reaches, each behind one function here.

Ray has no public way to do these four things, so each is reached through a private name that a
Ray release may move or change without notice. Every accessor first checks that the running Ray
is the one these were read from (:data:`TESTED_RAY`) and fails loudly on any other, naming what
to re-check, rather than let an upgrade change behaviour silently.

- :func:`clusters_switched_off`: a local Ray that listens on loopback only. Ray 2.60 replaces a
  loopback node address by the machine's outward one on Linux unless clusters are switched off
  (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, read once at import); there is no
  ``ray.init`` argument for it.
- :func:`drop_forwarded_lines`: the output of Ray's workers that Ray forwards to the driver's
  console, filtered. ``ray.init(log_to_driver=False)`` drops all of it, the project's own epoch
  lines from the Train workers included; a filter of single lines has no public hook.
- :func:`torch_backend_parts`: Ray Train's torch set-up, to serve the rendezvous store from a
  socket bound to loopback. ``TorchConfig.backend_cls`` is public, but the backend it returns,
  the helper that sets torch's environment variables and the older worker group class are not.
- :func:`job_environment`: the variables a Ray job (``ray job submit --runtime-env-json``)
  already hands to its workers. A job's driver that asks ``ray.init`` for the same variable is
  refused ("Failed to merge the Job's runtime env", with both environments, secrets included, in
  the message); the job's runtime environment reaches its driver only through the job manager's
  ``RAY_JOB_CONFIG_JSON_ENV_VAR`` (``ray._private.runtime_env.constants``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import ray

# The Ray release whose private names below were read and tested (pyproject pins it).
TESTED_RAY = "2.60.0"


class UntestedRayError(RuntimeError):
    """The running Ray is not the release the project's private uses were tested with."""


def require_tested_ray(what: str, version: str | None = None) -> None:
    """Raise :class:`UntestedRayError` unless Ray is :data:`TESTED_RAY` (``version``: the one to
    check, default the running Ray's)."""
    version = ray.__version__ if version is None else version
    if version != TESTED_RAY:
        raise UntestedRayError(
            f"{what} uses a private part of Ray read from Ray {TESTED_RAY}, but Ray {version} is "
            f"installed: install ray=={TESTED_RAY} (as pyproject.toml pins), or re-check "
            "pipeline/runtime/ray_internals.py against the new release and raise TESTED_RAY")


@contextlib.contextmanager
def clusters_switched_off() -> Iterator[None]:
    """Ray's cluster switch off for the duration (see the module's docstring), then restored."""
    require_tested_ray("a local Ray on loopback")
    from ray._private import ray_constants

    clusters = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clusters


def job_environment() -> dict[str, str]:
    """The environment variables of the runtime environment of the Ray job this process is the
    driver of (empty outside a job)."""
    require_tested_ray("a job driver's runtime environment")
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    text = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not text:
        return {}
    runtime_env = json.loads(text).get("runtime_env") or {}
    return dict(runtime_env.get("env_vars") or {})


def torch_backend_parts() -> tuple[type, Any, type]:
    """Ray Train's torch backend class, its function that sets torch.distributed's environment
    variables on each worker, and the older worker group class (which sets them itself)."""
    require_tested_ray("the rendezvous store on loopback")
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
    from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

    return _TorchBackend, _set_torch_distributed_env_vars, V1WorkerGroup


def drop_forwarded_lines(drop: Callable[[str], bool]) -> None:
    """From now on, a line of worker output that Ray forwards to this process's console is left
    out when ``drop(line)`` is true (every other line is printed as before). Call after
    ``ray.init``; calling it again changes nothing."""
    require_tested_ray("the console's filter of forwarded worker lines")
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def filtered(handle: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        def handle_kept(data: dict[str, Any]) -> None:
            lines = [line for line in data.get("lines", []) if not drop(line)]
            if lines:
                handle({**data, "lines": lines})

        handle_kept.drops_lines = True  # type: ignore[attr-defined]
        return handle_kept

    with dispatcher._lock:
        dispatcher.handlers = [
            (name, filtered(handle) if name == "ray_print_logs" and not getattr(handle, "drops_lines", False)
             else handle) for name, handle in dispatcher.handlers]
