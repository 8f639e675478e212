"""Batch-1 single-thread onnxruntime latency of the four regressors at 120x120.

    .venv/bin/python -m benchmarks.onnx_latency --runs 300 --json onnx_latency.json

Each network is exported (freshly initialised, BatchNorm statistics set from one random batch
so activations have trained-like magnitudes rather than vanishing into denormals), loaded into
an onnxruntime CPU session with one intra-op and one inter-op thread and all graph
optimisations, warmed up, then timed for ``--runs`` runs in ``--rounds`` interleaved rounds
(so slow drifts of the machine hit every network alike). Prints a markdown table (median and
90th percentile) and writes the figures with ``--json``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from models.onnx_export import INPUT_NAME, export_onnx
from models.registry import INPUT_SIZE, build_model, count_complexity
from pipeline.common import write_json

ARCHS = ("mobile-frnet", "mobile-frnet-noatt", "mobilenet-v2", "mobilenet-v1")
CALIBRATION_BATCH = 16


def calibrate_batchnorm(model: nn.Module, seed: int) -> None:
    """Set every BatchNorm's running statistics from one random batch, then switch to eval."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch sets the statistics
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        model(torch.randn(CALIBRATION_BATCH, 3, INPUT_SIZE, INPUT_SIZE, generator=generator))
    model.eval()


def single_thread_session(onnx_path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def time_runs(session: ort.InferenceSession, image: np.ndarray, runs: int) -> list[float]:
    """Wall time of ``runs`` calls, in milliseconds."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, {INPUT_NAME: image})
        times.append((time.perf_counter() - started) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="timed runs per network (>= 200)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=50, help="untimed runs per network")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.runs < 200 or args.rounds < 1 or args.warmup < 0:
        parser.error(f"need --runs >= 200, --rounds >= 1, --warmup >= 0; got {args.runs}, "
                     f"{args.rounds}, {args.warmup}")
    image = np.random.default_rng(args.seed).standard_normal(
        (1, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    sessions, complexity = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            model = build_model(arch)
            calibrate_batchnorm(model, args.seed)
            complexity[arch] = count_complexity(model)
            sessions[arch] = single_thread_session(export_onnx(model, Path(tmp) / f"{arch}.onnx"))
            time_runs(sessions[arch], image, args.warmup)
        times: dict[str, list[float]] = {arch: [] for arch in ARCHS}
        per_round = -(-args.runs // args.rounds)
        for _ in range(args.rounds):
            for arch in ARCHS:
                times[arch] += time_runs(sessions[arch], image, per_round)
    rows = []
    for arch in ARCHS:
        samples = times[arch]
        rows.append({"arch": arch, **complexity[arch], "runs": len(samples),
                     "median_ms": statistics.median(samples),
                     "p90_ms": float(np.percentile(samples, 90))})
    print(f"machine: {platform.processor() or platform.machine()}, onnxruntime {ort.__version__}, "
          "batch 1, intra_op_num_threads=1, inter_op_num_threads=1")
    print("| arch | params (M) | MACs (M) | median ms | p90 ms |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['arch']} | {row['params'] / 1e6:.3f} | {row['macs'] / 1e6:.1f} "
              f"| {row['median_ms']:.2f} | {row['p90_ms']:.2f} |")
    write_json(args.json, {"onnxruntime": ort.__version__, "machine": platform.machine(),
                           "input_size": INPUT_SIZE, "batch": 1, "threads": 1, "rows": rows})


if __name__ == "__main__":
    main()
