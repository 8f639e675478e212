"""Small helpers every stage script shares: logging set-up, progress lines, figure files."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )


def add_arch_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--arch`` (a registered network) and ``--width`` (its width multiplier)."""
    from models.registry import ARCHITECTURES

    parser.add_argument("--arch", required=required, choices=list(ARCHITECTURES))
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier")


def init_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    """Join the cluster a plain ``ray.init()`` would join (RAY_ADDRESS, or the one ``ray start``
    recorded on this machine), else start a local Ray on ``num_cpus`` CPUs.

    A local Ray started here tells its own processes where its dashboard is. Ray Train's
    placement-group cleaner asks the state API for "the" local instance; with a second Ray on the
    same machine that lookup fails, and a trial Tune stops early (its Train controller killed with
    it) would keep its workers' CPUs reserved until the sweep ends.
    """
    import socket

    import ray
    from ray._private import services  # the rule plain ray.init() applies, ray==2.60

    if services.canonicalize_bootstrap_address(None) is not None:
        ray.init(**kwargs)
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runtime_env = {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
    # The dashboard stays on: Ray Train's controller queries the state API it serves.
    ray.init(address="local", num_cpus=num_cpus, dashboard_port=port, runtime_env=runtime_env, **kwargs)


def write_json(path: Path | None, figures: dict[str, Any]) -> None:
    """Write a stage's figures to ``--json PATH`` (parent folders created)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def progress_logger(
    logger: logging.Logger, what: str, every_seconds: float = 5.0
) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback logging at most every few seconds, and at the end."""
    started = time.perf_counter()
    last = [started]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] >= every_seconds:
            last[0] = now
            rate = done / max(now - started, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            logger.info("%s: %d/%d (%.1f/s, %.0f s left)", what, done, total, rate, eta)

    return report
