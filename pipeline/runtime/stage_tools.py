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
    """The project's log lines on the console, and the libraries' as :mod:`pipeline.runtime.console`
    sets them (``verbose``: all of them)."""
    from pipeline.runtime.console import SecretFilter, setup_console

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(SecretFilter())
    setup_console(verbose)


EXIT_STATUS = ("Exit status: 0 done; 1 an input's content is bad (an image, annotation, dataset, shard "
               "or model met while running) or a check failed; 2 the command cannot start as given (a "
               "flag, a config key, a path that does not exist, an output in use).")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default, unless the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = all(action.default is not value for value in (None, False, argparse.SUPPRESS))
        if action.option_strings and shown and "(default" not in text:
            text += " (default: %(default)s)"
        return text


def stage_parser(prog: str, doc: str | None, inputs_rule: bool = False) -> argparse.ArgumentParser:
    """A stage's argument parser: its docstring's first paragraph, defaults shown, the exit
    statuses (and, for stages that read input paths, where relative ones are looked up)."""
    from pipeline.runtime.paths import RULE

    epilog = f"{RULE}\n\n{EXIT_STATUS}" if inputs_rule else EXIT_STATUS
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0], epilog=epilog,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--verbose", action="store_true",
                        help="also print what Ray, torch and MLflow log (default: the project's lines only)")
    return parser


def add_arch_arguments(parser: argparse.ArgumentParser, from_file: bool = False) -> None:
    """``--arch`` (a registered network) and ``--width`` (its width multiplier). With
    ``from_file`` both may come from a model file instead (:func:`resolve_arch`)."""
    from models.architectures import ARCHITECTURES

    recorded = " (default: what the --checkpoint model file records; a flag must agree with it)"
    parser.add_argument("--arch", required=not from_file, choices=list(ARCHITECTURES),
                        help="the network" + (recorded if from_file else ""))
    parser.add_argument("--width", type=float, default=None if from_file else 1.0,
                        help="width multiplier" + (recorded if from_file else " (default: 1.0)"))


def resolve_arch(arch: str | None, width: float | None, checkpoint: Path | None) -> tuple[str, float]:
    """The network and width: a project model file's own record, which flags may only repeat;
    for other weights (a state dict, a 3DDFA_V2 checkpoint) or none, ``--arch`` and ``--width``
    (default 1.0). Raises ConfigError on a missing or disagreeing flag, ValueError on an unreadable
    file."""
    from models.checkpoint import recorded_arch
    from pipeline.runtime.config import ConfigError

    recorded = recorded_arch(checkpoint) if checkpoint is not None else None
    if recorded is None:
        if arch is None:
            what = f"{checkpoint} records no network (not a model file of this project)" if checkpoint \
                else "no --checkpoint model file to read it from"
            raise ConfigError(f"--arch is needed: {what}")
        return arch, 1.0 if width is None else width
    file_arch, file_width = recorded
    for flag, given, stored in (("--arch", arch, file_arch), ("--width", width, file_width)):
        if given is not None and given != stored:
            raise ConfigError(f"{flag} {given} disagrees with {checkpoint}, which records {file_arch} "
                             f"width {file_width:g}: drop the flag (the file says what it holds)")
    return file_arch, file_width


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
            logger.info("%s: %d/%d (%.1f/s, %s left)", what, done, total, rate, duration(eta))

    return report


def duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2.5 h``: a time left, as precise as it is worth."""
    if not seconds < float("inf"):
        return "unknown time"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
