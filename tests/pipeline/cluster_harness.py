"""Real multi-node Ray clusters on this machine for tests: a head (`ray start --head`) and a second
node (`ray start --address`), optionally in a mount namespace of its own that hides folders of
the head (a node that does not share the head's disk). Everything a test starts, it stops.

How it stays out of other people's way on a shared machine:

- Authentication: `ray start --head` turns token authentication on by itself when
  ~/.ray/auth_token exists, but `ray start --address` does not, so a second node is refused with
  InvalidAuthToken. Rather than disable authentication (the GCS and raylets listen on every
  interface) or depend on ~/.ray, every process of this cluster gets ``RAY_AUTH_MODE=token`` and
  a fresh ``RAY_AUTH_TOKEN``: the nodes, the job CLI, the preprocessing driver.
- Temp dirs: `ray start` records the cluster's address in TEMP_DIR/ray_current_cluster, and a
  plain ``ray.init()`` elsewhere connects to whatever /tmp/ray/ray_current_cluster names. Each
  node gets its own ``--temp-dir`` (see :func:`start_cluster`) and writes the file there, so the
  one in /tmp/ray is never touched; the test checks that it is unchanged afterwards. (`ray stop`
  would reset only /tmp/ray's file, and stop every Ray on the machine: it is never used.) The
  temp dirs are short, under /tmp, because Ray's Unix socket paths live in them. Ray's own code
  that looks the cluster up by itself would read /tmp/ray's file too, hence ``RAY_ADDRESS``.
- Ports: every port Ray would otherwise take from a fixed default (GCS 6379, dashboard 8265,
  client server 10001, dashboard agent 52365, ...) is a free one found by binding to port 0.
  Ray swaps 127.0.0.1 for this machine's routable address when it registers a node (a cluster
  of loopback nodes is refused); the clients here all use 127.0.0.1.
- Processes: each command starts in a session of its own. The daemons `ray start` leaves behind
  stay in its session (the raylet gives each worker its own process group, not a new session);
  the job supervisor runs the job's driver in a new session, found as a descendant. Teardown
  sends SIGTERM, then SIGKILL, to exactly those processes and fails if any is left.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# The virtualenv's own commands (not resolved: the venv's python is a symlink to the base one).
VENV_BIN = Path(sys.executable).parent
CLUSTER_UP_S = 120
MLFLOW_UP_S = 60
STOP_GRACE_S = 10
# Logical CPUs. Ray Data's read and decode tasks take a whole CPU each by default; with 1 CPU per
# node, the 0.4 CPU of a worker on each left no node a whole one, and the run hung ("Cluster
# resources are not enough to run any task from TaskPoolMapOperator[ReadFilesParquetV2]").
# The head keeps a CPU for them; the workers are kept apart by placement, not by CPU counts.
HEAD_CPUS = 2
NODE_CPUS = 1
# Environment variables of the caller that would point this test's processes elsewhere.
FOREIGN_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
               "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


class Deadline:
    """A time bound; each wait under it takes the smaller of its own cap and what is left."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = seconds, what
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"{self.what}: not done within {self.seconds:.0f} s")
        return remaining if cap is None else min(cap, remaining)

    def within(self, seconds: float, what: str) -> Deadline:
        """A bound for one stage: ``seconds`` or what is left of this one, if less."""
        return Deadline(self.left(seconds), what)


# -- processes --------------------------------------------------------------------------------

def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, state letter) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        state, ppid, _pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
        table[int(entry)] = (int(ppid), int(session), state)
    return table


def session_members(sessions: set[int]) -> set[int]:
    """Live processes in ``sessions``, their descendants, and the sessions those descendants
    opened (a Ray job's driver runs in a new session under the job supervisor)."""
    table = process_table()
    own = {os.getpid(), os.getsid(0)}
    sessions = set(sessions) - own
    found: set[int] = set()
    while True:
        grown = {pid for pid, (ppid, session, state) in table.items()
                 if state != "Z" and (session in sessions or ppid in found)} - own
        sessions |= {table[pid][1] for pid in grown} - own
        if grown == found:
            return found
        found = grown


def describe(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        command = "?"
    return f"{pid}: {command[:160]}"


def store_has_run(database: Path, name: str) -> bool:
    """Whether a driver has made a run named ``name`` in the sqlite MLflow store ``database``, read
    with sqlite alone, read-only: an MLflow client opening a store whose tables are still being made
    would migrate it too, racing the driver."""
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            return connection.execute("SELECT COUNT(*) FROM runs WHERE name = ?", (name,)).fetchone()[0] > 0
    except sqlite3.Error:  # no store yet, or its tables not made yet
        return False


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"({path} unreadable)"


class Processes:
    """The commands this test runs, each in a session of its own, and what they leave behind."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.sessions: set[int] = set()
        self.popens: list[subprocess.Popen] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        """Start ``command`` with its output in LOG_DIR/NAME.log (a file, not a pipe: daemons
        that inherit a pipe would keep it open after the command exits)."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.sessions.add(popen.pid)
        self.popens.append(popen)
        return popen, log_path

    def run(self, name: str, command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
        """Run ``command`` to its end within ``timeout`` seconds: (exit status, output)."""
        popen, log_path = self.start(name, command, env)
        try:
            returncode = popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(command[:4])} ...` did not finish in {timeout:.0f} s:\n{tail(log_path)}")
        self.forget_if_empty(popen.pid)
        return returncode, log_path.read_text(errors="replace")

    def forget_if_empty(self, session: int) -> None:
        """Drop a session nothing runs in any more: its id is a pid, and pids are reused (often
        within minutes where pid_max is 32768), so a stale one could later name a stranger's."""
        if not session_members({session}):
            self.sessions.discard(session)

    def stop(self, sessions: set[int] | None = None) -> list[str]:
        """SIGTERM, then SIGKILL, every process of ``sessions`` (default: all of this test's);
        returns any left."""
        sessions = self.sessions if sessions is None else sessions
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in session_members(sessions):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + STOP_GRACE_S
            while session_members(sessions) and time.monotonic() < end:
                time.sleep(0.2)
        for popen in self.popens:  # reap the direct children
            if popen.pid in sessions:
                try:
                    popen.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
        return [describe(pid) for pid in sorted(session_members(sessions))]


# -- the cluster and the server ---------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on every interface right now (all sockets held until all are
    chosen, so none is handed out twice)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def node_ports(ports: Iterator[int]) -> list[str]:
    """The `ray start` options of the ports every node opens."""
    return ["--node-manager-port", str(next(ports)), "--object-manager-port", str(next(ports)),
            "--dashboard-agent-listen-port", str(next(ports)),
            "--dashboard-agent-grpc-port", str(next(ports)),
            "--runtime-env-agent-port", str(next(ports)), "--metrics-export-port", str(next(ports))]


@dataclass(frozen=True)
class Cluster:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]  # for every process of and client to this cluster (its token)
    node_ids: frozenset[str]
    second_node: int  # the session of the second node's `ray start`: its raylet and workers


def ray_cli(processes: Processes, cluster_env: dict[str, str], name: str, args: list[str],
            timeout: float) -> tuple[int, str]:
    return processes.run(name, [str(VENV_BIN / "ray"), *args], cluster_env, timeout)


def alive_nodes(processes: Processes, env: dict[str, str], dashboard_url: str,
                timeout: float) -> list[dict]:
    status, output = ray_cli(processes, env, "list-nodes",
                             ["list", "nodes", "--address", dashboard_url, "--format", "json"], timeout)
    if status != 0:
        return []
    start = output.find("[")
    try:
        nodes = json.loads(output[start:]) if start >= 0 else []
    except ValueError:
        return []
    return [node for node in nodes if node["state"] == "ALIVE"]


def hidden(folders: list[Path], command: list[str]) -> list[str]:
    """``command`` run in a mount namespace of its own in which each of ``folders`` is an empty
    tmpfs: what it and every process it leaves behind (a node's raylet and workers) see of them.
    The other folders are the host's, as a disk every node mounts would be."""
    script = 'while [ "$1" != -- ]; do mount -t tmpfs frnet-hidden "$1"; shift; done; shift; exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec", script, "sh",
            *map(str, folders), "--", *command]


def start_node(processes: Processes, name: str, args: list[str], env: dict[str, str],
               up_by: Deadline, hide: list[Path] | None = None) -> int | None:
    """`ray start ARGS` (in a namespace hiding ``hide``); on failure its processes are stopped
    again. Returns the session its daemons stay in, or None where it failed: on a loaded machine
    a node can miss Ray's fixed 30 s wait for its raylet to register, so callers try again."""
    command = [str(VENV_BIN / "ray"), "start", *args]
    popen, log_path = processes.start(name, hidden(hide, command) if hide else command, env)
    try:
        popen.wait(timeout=up_by.left())
    except subprocess.TimeoutExpired:
        pytest.fail(f"{up_by.what}: `ray start` did not return within {up_by.seconds:.0f} s:\n"
                    f"{tail(log_path)}")
    if popen.returncode != 0:
        processes.stop({popen.pid})
        processes.forget_if_empty(popen.pid)
        return None
    return popen.pid


def start_cluster(processes: Processes, temp_dir: Path, env: dict[str, str],
                  deadline: Deadline, hide: list[Path] | None = None,
                  resources: dict[str, float] | None = None) -> Cluster:
    """A head and a second node on this machine, each with its own temp dir under ``temp_dir``:
    a node's temp dir is node-local state (its runtime environments, sockets and logs), and two
    nodes sharing one delete each other's copy of a job's working directory. With ``hide``, the
    second node does not see those folders, nor the head's temp dir (as a machine of its own).
    ``resources``: custom resources each node declares (`ray start --resources`)."""
    up_by = deadline.within(CLUSTER_UP_S, "starting the two-node cluster")
    # A job's entrypoint `python` is looked up on the node's PATH (Ray does not put its own
    # interpreter there): the venv's bin first, as if `ray start` ran in the activated venv.
    env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])}
    common = ["--node-ip-address", "127.0.0.1", "--object-store-memory", str(200 * 2**20),
              "--disable-usage-stats", *(["--resources", json.dumps(resources)] if resources else [])]
    for attempt in itertools.count():
        ports = iter(free_ports(9))
        gcs_port, dashboard_port, client_port = next(ports), next(ports), next(ports)
        # Every process of the cluster inherits RAY_ADDRESS. Without it, code in Ray's workers
        # that finds "its" cluster on its own (Train's placement-group cleaner asks the state
        # API) reads /tmp/ray/ray_current_cluster, not this cluster's, then falls back to
        # looking for a single gcs_server on the machine, and fails when others run Ray too.
        node_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}
        if start_node(processes, f"ray-start-head-{attempt}", [
            "--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port),
            "--num-cpus", str(HEAD_CPUS), "--temp-dir", str(temp_dir / "head"), *node_ports(ports), *common,
        ], node_env, up_by) is not None:
            break
    gcs_address = node_env["RAY_ADDRESS"]
    for attempt in itertools.count():
        second_node = start_node(processes, f"ray-start-node-{attempt}", [
            "--address", gcs_address, "--num-cpus", str(NODE_CPUS), "--temp-dir", str(temp_dir / "node"),
            *node_ports(iter(free_ports(6))), *common,
        ], node_env, up_by, hide=None if hide is None else [*hide, temp_dir / "head"])
        if second_node is not None:
            break
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    # Exactly two: a node of a failed attempt stays ALIVE until the GCS misses its heartbeats.
    while len(nodes := alive_nodes(processes, node_env, dashboard_url, up_by.left())) != 2:
        time.sleep(1)
    return Cluster(gcs_address, dashboard_url, node_env, frozenset(node["node_id"] for node in nodes),
                   second_node)


def kill_raylet(cluster: Cluster) -> int:
    """SIGKILL the second node's raylet, as when its machine is lost; returns its pid. Its
    workers notice and exit; the GCS marks the node dead once its health checks fail."""
    members, table = session_members({cluster.second_node}), process_table()
    named = {pid for pid in members
             if Path(describe(pid).split(": ", 1)[1].split(" ", 1)[0]).name == "raylet"}
    # A raylet's short-lived forks (on the way to starting a worker) carry its name too.
    raylets = [pid for pid in named if table.get(pid, (0,))[0] not in named]
    assert len(raylets) == 1, [describe(pid) for pid in members]
    os.kill(raylets[0], signal.SIGKILL)
    return raylets[0]


def wait_for_mlflow(server: subprocess.Popen, log_path: Path, uri: str, deadline: Deadline) -> None:
    wait_for_url(server, log_path, f"{uri}/health",
                 deadline.within(MLFLOW_UP_S, "waiting for the mlflow server's /health"))


def wait_for_url(server: subprocess.Popen, log_path: Path, url: str, up_by: Deadline) -> None:
    """Until ``url`` answers 200, failing if ``server`` exits first or ``up_by`` passes."""
    while True:
        if server.poll() is not None:
            pytest.fail(f"`{' '.join(map(str, server.args[:3]))}` exited with {server.returncode}:\n"
                        f"{tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > up_by.end:
            pytest.fail(f"{up_by.what}: no answer within {up_by.seconds:.0f} s:\n{tail(log_path)}")
        time.sleep(0.5)


def default_address_file() -> Path:
    """Where a plain ``ray.init()`` looks for the latest cluster (Ray's own rule)."""
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(root) / "ray" / "ray_current_cluster"


def read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


@contextmanager
def kept_processes(log_dir: Path) -> Iterator[tuple[Processes, Path]]:
    """Processes logging to ``log_dir`` and a Ray temp dir; afterwards nothing of them is left
    running and the machine's default ray_current_cluster is as it was."""
    address_file = default_address_file()
    before = read_or_none(address_file)
    temp_dir = Path(tempfile.mkdtemp(prefix="frnet-ray-", dir="/tmp"))
    keeper = Processes(log_dir)
    try:
        yield keeper, temp_dir
    finally:
        left = keeper.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, "still running after teardown:\n" + "\n".join(left)
    assert read_or_none(address_file) == before, f"{address_file} was changed"


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[tuple[Processes, Path]]:
    """The test's processes and a Ray temp dir (:func:`kept_processes`)."""
    with kept_processes(tmp_path / "logs") as kept:
        yield kept
