"""Batch-1 single-thread onnxruntime latency of the four regressors at 120x120.

    .venv/bin/python -m benchmarks.onnx_latency --runs 300 --json onnx_latency.json

Each network is exported (freshly initialised, BatchNorm statistics set from one random batch
so activations have trained-like magnitudes rather than vanishing into denormals) by the same
:func:`models.onnx_export.export_onnx`, loaded into an onnxruntime CPU session with the same
options (one intra-op and one inter-op thread, sequential execution, all graph optimisations)
and warmed up. The ``--runs`` timed runs of each network are then taken in ``--rounds`` short
interleaved rounds, the order of the networks rotating from round to round, so that a slow
spell of the machine hits every network alike. Each round starts with ``--round-warmup``
untimed runs: after another network has run, the first calls are slower while caches refill
(on Machine A the first call of a round took 1.6x the steady time for Mobile-FRNet and 1.2x
for MobileNetV1, the fourth still 1.06x and 1.02x), and the latency of interest is the steady
one of a network that runs call after call. Prints a markdown table (median and 90th
percentile over all timed runs), Mobile-FRNet's latency relative to 3DDFA_V2's MobileNetV1 in
the same run (the ratio of the medians and the median of the per-round ratios) and the 1-min
load average before and after the timing: other processes slow Mobile-FRNet's many small
operations more than MobileNetV1's few large convolutions. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from models.frame import CROP_SIZE
from models.onnx_export import INPUT_NAME, export_onnx
from models.registry import build_model, count_complexity
from pipeline.common import write_json

ARCHS = ("mobile-frnet", "mobile-frnet-noatt", "mobilenet-v2", "mobilenet-v1")
TARGET, REFERENCE = "mobile-frnet", "mobilenet-v1"
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
        model(torch.randn(CALIBRATION_BATCH, 3, CROP_SIZE, CROP_SIZE, generator=generator))
    model.eval()


def single_thread_session(onnx_path: Path) -> ort.InferenceSession:
    """The session every network is timed in: one thread, all graph optimisations."""
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


def interleaved_times(sessions: dict[str, ort.InferenceSession], image: np.ndarray, runs: int,
                      rounds: int, round_warmup: int) -> list[dict[str, list[float]]]:
    """Per round, ``round_warmup`` untimed and ``ceil(runs / rounds)`` timed runs of each
    network, the order of the networks rotating from round to round."""
    per_round = -(-runs // rounds)
    names = list(sessions)
    results = []
    for index in range(rounds):
        order = names[index % len(names):] + names[:index % len(names)]
        timed = {}
        for name in order:
            time_runs(sessions[name], image, round_warmup)
            timed[name] = time_runs(sessions[name], image, per_round)
        results.append(timed)
    return results


def latency_ratio(rounds: list[dict[str, list[float]]], target: str,
                  reference: str) -> tuple[float, float]:
    """``target``/``reference`` latency: ratio of the overall medians, median per-round ratio."""
    overall = (statistics.median([t for r in rounds for t in r[target]])
               / statistics.median([t for r in rounds for t in r[reference]]))
    per_round = statistics.median(statistics.median(r[target]) / statistics.median(r[reference])
                                  for r in rounds)
    return overall, per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="timed runs per network (>= 200)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=50, help="untimed runs per network")
    parser.add_argument("--round-warmup", type=int, default=5,
                        help="untimed runs of each network at the start of every round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if (args.runs < 200 or not 1 <= args.rounds <= args.runs or args.warmup < 0
            or args.round_warmup < 0):
        parser.error(f"need --runs >= 200, 1 <= --rounds <= --runs, --warmup >= 0, "
                     f"--round-warmup >= 0; got {args.runs}, {args.rounds}, {args.warmup}, "
                     f"{args.round_warmup}")
    image = np.random.default_rng(args.seed).standard_normal(
        (1, 3, CROP_SIZE, CROP_SIZE)).astype(np.float32)
    sessions, complexity = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            model = build_model(arch)
            calibrate_batchnorm(model, args.seed)
            complexity[arch] = count_complexity(model)
            sessions[arch] = single_thread_session(export_onnx(model, Path(tmp) / f"{arch}.onnx"))
            time_runs(sessions[arch], image, args.warmup)
        load_before = os.getloadavg()[0]
        rounds = interleaved_times(sessions, image, args.runs, args.rounds, args.round_warmup)
        load_after = os.getloadavg()[0]
    rows = []
    for arch in ARCHS:
        samples = [t for r in rounds for t in r[arch]]
        rows.append({"arch": arch, **complexity[arch], "runs": len(samples),
                     "median_ms": statistics.median(samples),
                     "p90_ms": float(np.percentile(samples, 90))})
    ratio, per_round_ratio = latency_ratio(rounds, TARGET, REFERENCE)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"onnxruntime {ort.__version__}, batch 1, intra_op_num_threads=1, "
          f"inter_op_num_threads=1, {args.rounds} interleaved rounds of {args.round_warmup} "
          f"untimed + {-(-args.runs // args.rounds)} timed runs, "
          f"1-min load average {load_before:.2f} before / {load_after:.2f} after")
    print("| arch | params (M) | MACs (M) | median ms | p90 ms |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['arch']} | {row['params'] / 1e6:.3f} | {row['macs'] / 1e6:.1f} "
              f"| {row['median_ms']:.2f} | {row['p90_ms']:.2f} |")
    print(f"{TARGET} / {REFERENCE}: {ratio:.3f} (ratio of medians), "
          f"{per_round_ratio:.3f} (median of the {args.rounds} per-round ratios)")
    write_json(args.json, {"onnxruntime": ort.__version__, "machine": platform.machine(),
                           "input_size": CROP_SIZE, "batch": 1, "threads": 1,
                           "rounds": args.rounds, "round_warmup": args.round_warmup,
                           "rows": rows,
                           "load_average": {"before": load_before, "after": load_after},
                           "ratio": {"target": TARGET, "reference": REFERENCE,
                                     "of_medians": ratio, "median_per_round": per_round_ratio}})


if __name__ == "__main__":
    main()
