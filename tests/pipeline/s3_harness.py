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
