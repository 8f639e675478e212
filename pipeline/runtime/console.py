"""The console every stage shares: the project's own lines by default (stage headers, progress,
one line an epoch or a trial, the final table); with ``--verbose``, all that Ray, Ray Data, Ray
Train, Ray Tune, torch and MLflow print besides.

Quiet is set where the noise starts: logger levels, warnings filters and Ray's own settings, in
the driver and, through the job's environment, in every Ray worker. Errors are never filtered:
library loggers keep their warnings and errors, and a Ray failure is reported with one line of
advice (:func:`run_main`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

VERBOSE_ENV = "FRNET_VERBOSE"
# Loggers whose INFO lines are a library's running commentary, not the project's.
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "mlflow", "alembic", "urllib3",
                   "filelock", "torch.distributed", "torch.nn.parallel.distributed")
# Loggers whose warnings only say that a display is off: tqdm is not installed, or the progress
# bars the stages turn off are off.
QUIET_WARNINGS_LOGGERS = ("ray.experimental.tqdm_ray", "ray.data._internal.progress")
# Warnings that hold nothing a user of this project can act on, by category and start of message.
KNOWN_WARNINGS = (
    # DDP on a network with depthwise convolutions: the gradient buckets are laid out for the
    # contiguous strides, a copy per step, no error.
    (UserWarning, "Grad strides do not match bucket view strides"),
    # Ray Data's own settings, deprecated in favour of others it sets itself.
    (DeprecationWarning, "`use_arrow_tensor_v2` is deprecated"),
    (DeprecationWarning, "`use_push_based_shuffle` is deprecated"),
    (DeprecationWarning, "`use_polars` is deprecated"),
    (DeprecationWarning, "`ray_remote_args` is deprecated"),
)
# Notices Ray logs in the driver that ask nothing of a user: (logger, start of message). A local
# Ray enables token authentication by itself and says so at every start.
KNOWN_NOTICES = (
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled for this"),
)
# Lines Ray's own actors print, forwarded to the driver, that report Ray's normal housekeeping:
# Ray Train's PreemptionWatcher actor is created with a restart policy its arguments cannot
# honour (an error-level line, though nothing failed), its PlacementGroupCleaner reports the
# clean-up at the end of every run, and Ray Data says in each actor that its bars are off.
FORWARDED_NOTICES = re.compile(
    r"Actor with class name: 'PreemptionWatcher' .* the actor restart will fail"
    r"|Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group"
    r"|Progress bars (for operators )?disabled\. To enable, set `ray\.data\.DataContext")
RAY_ADVICE = ("Ray failed, not the data or the config: check the cluster with `ray status` and its logs "
              "(Ray's session folder, logs/), then run the command again; `frnet train --resume` "
              "continues a run from its last checkpoint.")


def is_verbose() -> bool:
    """Whether this process (the driver, or a Ray worker of its job) runs verbose."""
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_libraries(verbose: bool) -> None:
    """The library loggers at WARNING and the known warnings ignored, in this process; nothing
    changes when ``verbose``."""
    if verbose:
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in QUIET_WARNINGS_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:  # Ray Train's worker set-up puts its own here
        if not any(isinstance(f, RayInfoFilter) for f in handler.filters):
            handler.addFilter(RayInfoFilter())
    for category, start in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    for name, start in KNOWN_NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoticeFilter) for f in logger.filters):
            logger.addFilter(NoticeFilter(start))


class NoticeFilter(logging.Filter):
    """Drops a logger's records whose message starts with ``start``; every other record passes."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def is_forwarded_notice(line: str) -> bool:
    """Whether a worker line Ray forwards is one of its housekeeping notices (FORWARDED_NOTICES)."""
    return FORWARDED_NOTICES.search(line) is not None


def quiet_forwarded_lines() -> None:
    """After Ray has started: its housekeeping notices left out of the forwarded worker output,
    unless the console is verbose."""
    if not is_verbose():
        from pipeline.runtime.ray_internals import drop_forwarded_lines

        drop_forwarded_lines(is_forwarded_notice)


class RayInfoFilter(logging.Filter):
    """Drops the INFO and DEBUG records Ray's own code logs through loggers outside ``ray.*`` (some
    are named after their file); its warnings and errors pass, as does everything else."""

    def __init__(self) -> None:
        super().__init__()
        import ray

        self.ray_folder = os.path.dirname(ray.__file__) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.ray_folder)


# The S3 variables whose values are secrets: never printed, whoever's message holds them (a Ray
# error may quote a job's whole runtime environment).
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def redact(text: str) -> str:
    """``text`` with the value of every secret variable set here replaced by ``***``."""
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value:
            text = text.replace(value, "***")
    return text


class SecretFilter(logging.Filter):
    """Log lines with the secrets' values replaced (:func:`redact`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def setup_console(verbose: bool) -> None:
    """The driver's console, before Ray starts: the choice goes to Ray's processes through the
    environment (:func:`worker_environment`)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not verbose:
        # Ray Data's progress becomes a log line every few seconds when not on a terminal.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
        # No progress bars from the datasets Ray Train and Tune run inside their own actors: a
        # bar redrawn from several processes is escape codes in a file and a jumble on a
        # terminal. The stages print their own progress (a line a shard, an epoch, a trial).
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        # Tune's new output engine prints its experiment banner at every verbosity; the older
        # one is silent at verbose=0, and the sweep prints a line per trial itself.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        if not sys.stdout.isatty():
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in a log file
    quiet_libraries(verbose)


def worker_environment() -> dict[str, str]:
    """The variables a Ray job's workers need to keep the driver's console choice."""
    names = (VERBOSE_ENV, "RAY_DATA_LOG_LEVEL", "RAY_DATA_DISABLE_PROGRESS_BARS")
    return {name: os.environ[name] for name in names if name in os.environ}


def causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and every error under it, outermost first: causes and contexts, the error inside a
    Ray task's error (``cause``), each worker's error of a failed Ray Train run
    (``worker_failures``) and its controller's (``controller_failure``). Ray Data and Ray Train
    wrap a failed read two or three deep."""
    seen: set[int] = set()
    pending = [err]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = [current.__cause__, current.__context__, getattr(current, "cause", None),
                 getattr(current, "controller_failure", None)]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            inner += list(failures.values())
        pending += [error for error in inner if isinstance(error, BaseException)]


@contextmanager
def sigint_seen() -> Iterator[Callable[[], bool]]:
    """Yields a check: whether Ctrl-C (SIGINT) arrived since the block began, whoever handled it;
    on leaving, the SIGINT handler of before is put back. Ray Train's ``fit`` installs a handler
    of its own (it aborts the run, then ``fit`` raises SystemExit) and leaves it installed; Python
    writes every signal it catches to the wakeup fd whatever the handler, so the signal is read
    there. Outside the main thread (where signals are not handled) the check is always False."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    handler = signal.getsignal(signal.SIGINT)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    received = bytearray()

    def seen() -> bool:
        try:
            while chunk := os.read(read_fd, 256):
                received.extend(chunk)
        except BlockingIOError:  # nothing more to read
            pass
        return signal.SIGINT in received

    try:
        yield seen
    finally:
        signal.set_wakeup_fd(previous_fd)
        if handler is not None:  # None: a handler installed outside Python, left as it is
            signal.signal(signal.SIGINT, handler)
        os.close(read_fd)
        os.close(write_fd)


def ray_failure(err: BaseException) -> bool:
    """Whether ``err`` is Ray's own failure (a process, node or the cluster), not the stage's."""
    import ray.exceptions

    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.RaySystemError,
                        ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                        ray.exceptions.WorkerCrashedError, ray.exceptions.GetTimeoutError,
                        ConnectionError)):
        return True
    return any(ray_failure(inner) for inner in (err.__cause__, err.__context__) if inner is not None)


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """A stage's ``main``; a Ray failure ends with its first line and one line of advice (the
    whole traceback with ``--verbose``) and exit status 1."""
    try:
        return int(main(argv) or 0)
    except Exception as err:
        if not ray_failure(err):
            raise
        if is_verbose():
            traceback.print_exc()
        message = redact(str(err)).strip().splitlines()
        print(f"error: {type(err).__name__}: {message[0] if message else ''}", file=sys.stderr)
        print(RAY_ADVICE, file=sys.stderr)
        return 1
