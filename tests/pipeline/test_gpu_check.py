"""The GPU check (``benchmarks/gpu_check.py``) where a CUDA device is present."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU check needs one")
def test_gpu_training_run_checks_out(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--images", "400", "--epochs", "3",
         "--batch-size", "64", "--json", str(tmp_path / "gpu.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "gpu.json").exists()


@pytest.mark.ray
def test_gpu_check_refuses_without_cuda(tmp_path):
    """Without CUDA the script says so and exits 2, rather than training on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal cannot be seen here")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr
