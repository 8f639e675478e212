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
