"""The `frnet` command as a user runs it: a real subprocess, real files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FRNET = [sys.executable, "-m", "pipeline.cli"]
pytestmark = pytest.mark.ray


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*FRNET, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_usage_lists_the_stages(tmp_path):
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0 and "synth" in result.stdout and "demo" in result.stdout
    result = run("nonsense", cwd=tmp_path)
    assert result.returncode == 2 and "unknown stage 'nonsense'" in result.stderr


def test_synth_writes_a_readable_folder_and_its_figures(tmp_path):
    result = run("synth", "--layout", "aflw2000-3d", "--n", "3", "--seed", "2",
                 "--out", str(tmp_path / "A"), "--workers", "1", "--json", str(tmp_path / "f.json"),
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "f.json").read_text())
    assert figures["images"] == 3 and figures["images_per_second"] > 0 and figures["synthetic"]
    assert sorted(p.name for p in (tmp_path / "A").glob("image*")) == [
        f"image0000{i}.{ext}" for i in range(3) for ext in ("jpg", "mat")]
    result = run("synth", "--layout", "aflw2000-3d", "--n", "0", "--out", str(tmp_path / "B"),
                 cwd=tmp_path)
    assert result.returncode == 2 and "command line: 'n' must be >= 1, got 0" in result.stderr


@pytest.mark.cluster
def test_demo_runs_end_to_end(tmp_path):
    """A small demo: every stage runs, the outputs land under --out and nothing outside it."""
    result = run("demo", "--out", str(tmp_path / "run"), "--train-images", "40", "--test-images", "8",
                 "--epochs", "1", "--no-tune", "--min-improvement", "0", "--workers", "2", cwd=tmp_path)
    run_dir = tmp_path / "run"
    figures = json.loads((run_dir / "demo.json").read_text())
    # One epoch on 40 faces fits badly: a flagged showcase face fails the demo, and only that.
    failures = figures["showcase"]["failures"]
    assert result.returncode == (1 if failures else 0), result.stderr[-3000:]
    assert all(f"{len(failures)} failed prediction" in result.stdout for _ in failures[:1])
    assert figures["data"]["round_trip_300w-lp"]["checked"] == 80  # 40 images and their flips
    assert figures["data"]["round_trip_aflw2000-3d"]["max_error_px"] <= 1e-4
    assert [s["stage"] for s in figures["stages"]] == [
        "synth", "preprocess", "train", "evaluate (champion)", "evaluate (mean face)", "showcase"]
    for report in (figures["champion"], figures["mean_face"]):
        assert sum(b["count"] for b in report["bins"]) == 8
    # The champion and the baseline differ: the trained network is what was evaluated.
    assert figures["champion"]["per_image"] != figures["mean_face"]["per_image"]
    no_face = [failure for failure in failures if "no face found" in failure]
    assert len(figures["showcase"]["faces"]) + len(no_face) == 4  # the four most frontal faces
    assert Path(figures["showcase"]["sheet"]).stat().st_size > 10000
    for picture in ("cumulative_errors.png", "nme_by_yaw.png", "landmark_overlays.png"):
        assert (run_dir / "evaluation" / "champion" / picture).stat().st_size > 1000
    assert "mean face" in result.stdout and f"sqlite:///{run_dir / 'mlflow.db'}" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no ./mlruns, nothing else
    again = run("demo", "--out", str(run_dir), cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr
