"""Starting Ray: a local-only flag against a running cluster is one clear line, before any work."""

import json
import os
import subprocess
import sys

import pytest

from pipeline.runtime.ray_session import cluster_to_join

FRNET = [sys.executable, "-m", "pipeline.cli"]


def clean_environment(tmp_path, **extra: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    return {**environment, "TMPDIR": str(tmp_path), **extra}


def test_cluster_to_join_follows_ray_address_then_the_ray_start_record(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_to_join() is None
    record = tmp_path / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    record.write_text("10.1.2.3:6379\n")
    assert cluster_to_join() == ("10.1.2.3:6379", f"`ray start` ({record})")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.9:6380")
    assert cluster_to_join() == ("127.0.0.9:6380", "RAY_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert cluster_to_join() is None


@pytest.mark.ray
@pytest.mark.parametrize("stage", ["preprocess", "train", "tune"])
def test_num_cpus_against_a_running_cluster_is_one_line(tmp_path, stage):
    """The flag only sizes a Ray started here; with RAY_ADDRESS set the stage refuses it in one
    line naming the cluster, exit 2, without connecting."""
    (tmp_path / "tune.yaml").write_text("train_config: train.yaml\n")
    (tmp_path / "train.yaml").write_text(f"epochs: 1\ndata:\n  shards: {tmp_path}\n")
    (tmp_path / "s.yaml").write_text("space: {loss.omega: {distribution: uniform, low: 1, high: 2}}\n")
    arguments = {"preprocess": ["--input", str(tmp_path), "--output", str(tmp_path / "out")],
                 "train": ["--config", str(tmp_path / "train.yaml")],
                 "tune": ["--config", str(tmp_path / "tune.yaml"), "--space", str(tmp_path / "s.yaml")],
                 }[stage]
    result = subprocess.run([*FRNET, stage, *arguments, "--num-cpus", "2"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path,
                            env=clean_environment(tmp_path, RAY_ADDRESS="127.0.0.9:6380"))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "--num-cpus 2" in lines[0] and "127.0.0.9:6380" in lines[0] and "RAY_ADDRESS" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_job_driver_asks_ray_only_for_variables_its_job_lacks(monkeypatch):
    """The job's runtime environment (ray job submit --runtime-env-json) reaches its driver in the
    job manager's variable; the variables it holds are the job's, and asking ray.init for one of
    them again would be refused."""
    from pipeline.runtime.ray_internals import job_environment

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_environment() == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"AWS_ENDPOINT_URL": "http://s3:9000"}}}))
    assert job_environment() == {"AWS_ENDPOINT_URL": "http://s3:9000"}
