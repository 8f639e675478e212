"""One rule for relative input paths: the current folder, then the project checkout."""

import os
import subprocess
import sys

import pytest

from pipeline.runtime.config import ConfigError
from pipeline.runtime.paths import CHECKOUT, SHARDS_HINT, input_location, input_path, model_source
from tests.conftest import REPO_ROOT

FRNET = [sys.executable, "-m", "pipeline.cli"]


def test_the_current_folder_comes_first_then_the_checkout(tmp_path, monkeypatch):
    assert CHECKOUT == REPO_ROOT
    monkeypatch.chdir(tmp_path)
    assert input_path("configs/train.yaml", "--config") == REPO_ROOT / "configs" / "train.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "train.yaml").write_text("epochs: 1\n")
    assert input_path("configs/train.yaml", "--config") == tmp_path / "configs" / "train.yaml"
    assert input_path(tmp_path / "configs", "--x") == tmp_path / "configs"
    assert input_location("s3://bucket/shards", "data.shards") == "s3://bucket/shards"


def test_an_input_found_nowhere_names_both_places_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        input_path("data/nope", "data.shards")
    assert str(caught.value) == (f"data.shards data/nope: not found (tried {tmp_path / 'data' / 'nope'} "
                                 f"or {REPO_ROOT / 'data' / 'nope'})")
    with pytest.raises(ConfigError, match=r"^--config /no/such.yaml: not found \(tried /no/such.yaml\)$"):
        input_path("/no/such.yaml", "--config")


def test_model_sources_get_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bfm").mkdir()
    (tmp_path / "dense.npz").write_bytes(b"")
    assert model_source("synthetic", "morphable_model") == "synthetic"
    assert model_source("bfm68:bfm", "morphable_model") == f"bfm68:{tmp_path / 'bfm'}"
    dense = f"dense:{tmp_path / 'dense.npz'}+bfm68:{tmp_path / 'bfm'}"
    assert model_source("dense:dense.npz+bfm68:bfm", "morphable_model") == dense
    with pytest.raises(ConfigError, match="morphable_model nothere: not found"):
        model_source("3ddfa:nothere", "morphable_model")


@pytest.mark.ray
def test_a_stage_run_from_elsewhere_finds_the_checkouts_config(tmp_path):
    """`frnet train --config configs/train.yaml` from another folder (as `ray submit` runs it)
    reads the checkout's config; a shard folder absent in both places is refused by name before
    Ray starts, exit 2."""
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([*FRNET, "train", "--config", "configs/train.yaml", "--shards", "no-such-shards"],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].endswith(
        f"--shards no-such-shards: not found (tried {tmp_path / 'no-such-shards'} "
        f"or {REPO_ROOT / 'no-such-shards'}); {SHARDS_HINT}"), result.stderr
    assert not (tmp_path / "runs").exists()
