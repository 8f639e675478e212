"""A real S3 endpoint on loopback for tests: moto's server (``moto_server``, from the dev extra),
the S3-compatible server Ray's own storage tests use. It answers the S3 REST protocol over HTTP
as MinIO or AWS would; the pipeline reaches it only through the variables the AWS tools read
(``AWS_ENDPOINT_URL``, the key pair, the region) and MLflow's ``MLFLOW_S3_ENDPOINT_URL``.

moto was chosen over MinIO because it installs from the package registries with pip (MinIO is a
separate binary download) and starts in about a second; it keeps objects in memory, so each
session's server starts empty.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.pipeline.cluster_harness import VENV_BIN, Deadline, Processes, free_ports, wait_for_url

S3_UP_S = 60
# moto accepts any key pair unless told to check them; these are what the tests sign with.
KEY_ID, SECRET = "frnet-test-key", "frnet-test-secret"


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    env: dict[str, str]  # the AWS (and MLflow) variables that point a process at this endpoint

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=self.url, access_key=KEY_ID, secret_key=SECRET,
                                 region="us-east-1", allow_bucket_creation=True, allow_bucket_deletion=True)

    def make_bucket(self, name: str) -> str:
        """A new empty bucket; its ``s3://`` URI."""
        self.filesystem().create_dir(name)
        return f"s3://{name}"


def s3_variables(url: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": url}


def moto_server() -> Path:
    """The server command, or a skip that names the install."""
    found = VENV_BIN / "moto_server"
    if not found.exists():
        which = shutil.which("moto_server")
        if which is None:
            pytest.skip("moto_server not found: the S3 tests need moto's server (pip install 'moto[server]', "
                        "part of the dev extra)")
        found = Path(which)
    return found


@contextmanager
def s3_endpoint(log_dir: Path, check_keys: bool = False) -> Iterator[tuple[S3Endpoint, Processes]]:
    """A moto server on a free loopback port, stopped afterwards. With ``check_keys`` it checks
    every request's signature against the keys it knows, of which it has none: any key pair is
    refused, as a server refuses a wrong key."""
    command = moto_server()
    keeper = Processes(log_dir)
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    if check_keys:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    popen, log_path = keeper.start("moto-server", [str(command), "-H", "127.0.0.1", "-p", str(port)], env)
    try:
        wait_for_url(popen, log_path, f"{url}/moto-api/", Deadline(S3_UP_S, "the S3 server"))
        yield S3Endpoint(url, s3_variables(url)), keeper
    finally:
        left = keeper.stop()
    assert not left, "still running after teardown:\n" + "\n".join(left)


class Relay:
    """A TCP relay from a loopback port of its own to the S3 server, through which a process
    reaches the endpoint, and which can take the endpoint away for a while: during
    :meth:`outage` every open connection is cut and every new one reset at once, as a stopped
    server's host answers (moto keeps its objects in memory, so stopping the server itself would
    lose the bucket). :meth:`outage_on` starts one at the first request whose bytes hold a given
    pattern (a key being written), which never reaches the server. ``turned_away`` counts the
    connections reset during outages: the proof that the process tried the endpoint while it was
    gone."""

    def __init__(self, server_url: str):
        host, port = server_url.removeprefix("http://").rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._trigger: tuple[bytes, float] | None = None
        self.turned_away = 0
        self._closed = False
        threading.Thread(target=self._accept, name="s3-relay", daemon=True).start()

    def endpoint(self) -> S3Endpoint:
        return S3Endpoint(self.url, s3_variables(self.url))

    def outage(self, seconds: float) -> None:
        """Cut every open connection and refuse new ones for ``seconds`` (returns at once)."""
        with self._lock:
            self._down_until = time.monotonic() + seconds
            cut, self._open = list(self._open), set()
        for sock in cut:
            reset(sock)

    def outage_on(self, pattern: bytes, seconds: float) -> None:
        """An outage of ``seconds`` from the first request to the server that holds ``pattern``."""
        self._trigger = (pattern, seconds)

    @property
    def outage_over(self) -> bool:
        """Whether an outage has started and ended."""
        return self._trigger is None and 0 < self._down_until <= time.monotonic()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.outage(0)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._down_until:
                self.turned_away += 1
                reset(client)
                continue
            try:
                server = socket.create_connection(self._target, timeout=10)
            except OSError:
                reset(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._open |= {client, server}
            pumps = [threading.Thread(target=self._pump, args=(*pair, watch), daemon=True)
                     for pair, watch in (((client, server), True), ((server, client), False))]
            for pump in pumps:
                pump.start()
            threading.Thread(target=self._close_after, args=(pumps, client, server), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, watch: bool) -> None:
        """Bytes from ``source`` to ``sink`` until ``source`` ends (its end passed on) or either
        fails (both reset); ``watch``: the requests' side, where an outage may be triggered."""
        try:
            while data := source.recv(65536):
                trigger = self._trigger
                if watch and trigger is not None and trigger[0] in data:
                    self._trigger = None
                    self.outage(trigger[1])
                    return
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            reset(source)
            reset(sink)

    def _close_after(self, pumps: list[threading.Thread], client: socket.socket,
                     server: socket.socket) -> None:
        for pump in pumps:
            pump.join()
        with self._lock:
            self._open -= {client, server}
        client.close()
        server.close()


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset (no lingering close), as a host with no server answers."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)  # wakes a thread waiting in recv on it
    except OSError:
        pass
    sock.close()
