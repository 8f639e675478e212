"""Batch-1 single-thread onnxruntime latency and batch-8 throughput of the regressors at 120x120.

    .venv/bin/python -m benchmarks.onnx_latency --runs 300 --json onnx_latency.json
    .venv/bin/python -m benchmarks.onnx_latency --runs 300 --load 1    # one busy core beside

Each network is exported (freshly initialised, BatchNorm statistics set from one random batch
so activations have trained-like magnitudes rather than vanishing into denormals) by the same
:func:`models.onnx_export.export_onnx`, in its inference form as users get it; Mobile-FRNet is
also exported as trained (``inference=False``) to show what the inference form saves. Each is
loaded into an onnxruntime CPU session with the same options (one intra-op and one inter-op
thread, sequential execution, all graph optimisations) and warmed up. The ``--runs`` timed runs
of each network are then taken in ``--rounds`` short interleaved rounds, the order of the
networks rotating from round to round, so that a slow spell of the machine hits every network
alike. Each round starts with ``--round-warmup`` untimed runs: after another network has run,
the first calls are slower while caches refill, and the latency of interest is the steady one of
a network that runs call after call. Then the same rounds at batch ``--batch`` (8: what a
service batches to) give the throughput in images per second. ``--load N`` keeps N busy
processes running beside the timing, a load that can be stated and repeated.

Prints the processor (model and vector extensions), a markdown table (median and 90th
percentile over all timed runs, the ratio to 3DDFA_V2's MobileNetV1, batch throughput),
Mobile-FRNet's latency relative to MobileNetV1 in the same run (the ratio of the medians and
the median of the per-round ratios) and the 1-min load average before and after the timing.
``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import multiprocessing
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

from models.architectures import build_model, count_complexity
from models.frame import CROP_SIZE
from models.onnx_export import INPUT_NAME, export_onnx
from pipeline.runtime.stage_tools import write_json

# (label, architecture, exported in its inference form): each network as users export it, and
# Mobile-FRNet's modules exported as trained beside it, to show what the inference form saves.
NETWORKS = (("mobile-frnet", "mobile-frnet", True),
            ("mobile-frnet (as trained)", "mobile-frnet", False),
            ("mobile-frnet-noatt", "mobile-frnet-noatt", True),
            ("mobilenet-v2", "mobilenet-v2", True),
            ("mobilenet-v1", "mobilenet-v1", True))
TARGET, REFERENCE = "mobile-frnet", "mobilenet-v1"
THROUGHPUT_BATCH = 8  # what a service batches to
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


# Vector extensions that decide which kernels onnxruntime's MLAS runs (AVX-512F: 16-channel
# blocked layout; AVX2 alone: 8), in the order they are printed.
VECTOR_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                     "avx512_fp16", "amx_tile", "avx_vnni")


def describe_processor() -> str:
    """The processor's model, family/model/stepping and vector extensions, from /proc/cpuinfo
    where there is one (Linux), else what the platform module knows."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    extensions = [e for e in VECTOR_EXTENSIONS if e in flags] or ["no AVX2"]
    name = fields.get("model name", platform.processor() or platform.machine())
    identity = ", ".join(f"{label} {fields[key]}" for key, label in
                         (("cpu family", "family"), ("model", "model"), ("stepping", "stepping"))
                         if key in fields)
    return f"{name} ({identity}), {os.cpu_count()} cpus, {' '.join(extensions)}"


def single_thread_session(onnx_path: Path, profile_prefix: Path | None = None,
                          optimised_path: Path | None = None) -> ort.InferenceSession:
    """The session every network is timed in: one thread, all graph optimisations.

    ``profile_prefix`` switches onnxruntime's profiler on, writing there; ``optimised_path``
    saves the graph as optimised for this session.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if optimised_path is not None:
        options.optimized_model_filepath = str(optimised_path)
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


def spin() -> None:
    """Keep one core busy until terminated (the stated load of ``--load``)."""
    while True:
        pass


def export_networks(folder: Path, seed: int) -> tuple[dict[str, Path], dict[str, dict]]:
    """Every network of :data:`NETWORKS` exported into ``folder``, and each one's complexity."""
    paths, complexity = {}, {}
    for label, arch, inference in NETWORKS:
        model = build_model(arch)
        calibrate_batchnorm(model, seed)
        complexity[label] = count_complexity(model)
        paths[label] = export_onnx(model, folder / f"{label}.onnx", inference=inference)
    return paths, complexity


def summarise(rounds: list[dict[str, list[float]]], label: str) -> tuple[float, float]:
    """Median and 90th percentile of one network's timed runs, in milliseconds."""
    samples = [t for r in rounds for t in r[label]]
    return statistics.median(samples), float(np.percentile(samples, 90))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="timed runs per network (>= 200)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=50, help="untimed runs per network")
    parser.add_argument("--round-warmup", type=int, default=5,
                        help="untimed runs of each network at the start of every round")
    parser.add_argument("--batch", type=int, default=THROUGHPUT_BATCH,
                        help="batch of the throughput rounds (0: none)")
    parser.add_argument("--load", type=int, default=0,
                        help="busy processes kept running beside the timing (a stated load)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if (args.runs < 200 or not 1 <= args.rounds <= args.runs or args.warmup < 0
            or args.round_warmup < 0 or args.batch < 0 or args.load < 0):
        parser.error(f"need --runs >= 200, 1 <= --rounds <= --runs, --warmup, --round-warmup, "
                     f"--batch and --load >= 0; got {args.runs}, {args.rounds}, {args.warmup}, "
                     f"{args.round_warmup}, {args.batch}, {args.load}")
    rng = np.random.default_rng(args.seed)
    image = rng.standard_normal((1, 3, CROP_SIZE, CROP_SIZE)).astype(np.float32)
    batch = rng.standard_normal((max(args.batch, 1), 3, CROP_SIZE, CROP_SIZE)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        paths, complexity = export_networks(Path(tmp), args.seed)
        sessions = {label: single_thread_session(path) for label, path in paths.items()}
        for session in sessions.values():
            time_runs(session, image, args.warmup)
        spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.load)]
        for spinner in spinners:
            spinner.start()
        try:
            time.sleep(1.0 if spinners else 0.0)  # let the load settle on its cores
            load_before = os.getloadavg()[0]
            rounds = interleaved_times(sessions, image, args.runs, args.rounds, args.round_warmup)
            batch_rounds = (interleaved_times(sessions, batch, max(args.runs // 4, args.rounds),
                                              args.rounds, 1) if args.batch else None)
            load_after = os.getloadavg()[0]
        finally:
            for spinner in spinners:
                spinner.terminate()
    rows = []
    for label, arch, inference in NETWORKS:
        median_ms, p90_ms = summarise(rounds, label)
        row = {"network": label, "arch": arch, "inference_form": inference, **complexity[label],
               "median_ms": median_ms, "p90_ms": p90_ms}
        if batch_rounds is not None:
            row["batch_median_ms"] = summarise(batch_rounds, label)[0]
            row["batch_images_per_s"] = args.batch / row["batch_median_ms"] * 1e3
        rows.append(row)
    ratio, per_round_ratio = latency_ratio(rounds, TARGET, REFERENCE)
    print(f"processor: {describe_processor()}; onnxruntime {ort.__version__}, "
          f"intra_op_num_threads=1, inter_op_num_threads=1; batch 1: {args.rounds} interleaved "
          f"rounds of {args.round_warmup} untimed + {-(-args.runs // args.rounds)} timed runs"
          + (f"; batch {args.batch}: {args.rounds} rounds" if args.batch else "")
          + f"; {args.load} busy processes beside; "
          f"1-min load average {load_before:.2f} before / {load_after:.2f} after")
    batch_header = f" batch-{args.batch} images/s |" if args.batch else ""
    print(f"| network | params (M) | MACs (M) | median ms | p90 ms | vs {REFERENCE} |{batch_header}")
    print("|---|---|---|---|---|---|" + ("---|" if args.batch else ""))
    reference_ms = summarise(rounds, REFERENCE)[0]
    for row in rows:
        batch_cell = f" {row['batch_images_per_s']:.0f} |" if args.batch else ""
        print(f"| {row['network']} | {row['params'] / 1e6:.3f} | {row['macs'] / 1e6:.1f} "
              f"| {row['median_ms']:.2f} | {row['p90_ms']:.2f} "
              f"| {row['median_ms'] / reference_ms:.3f} |{batch_cell}")
    print(f"{TARGET} / {REFERENCE}: {ratio:.3f} (ratio of medians), "
          f"{per_round_ratio:.3f} (median of the {args.rounds} per-round ratios)")
    write_json(args.json, {"onnxruntime": ort.__version__, "machine": platform.machine(),
                           "processor": describe_processor(), "input_size": CROP_SIZE,
                           "threads": 1, "rounds": args.rounds, "round_warmup": args.round_warmup,
                           "batch": args.batch, "load_processes": args.load, "rows": rows,
                           "load_average": {"before": load_before, "after": load_after},
                           "ratio": {"target": TARGET, "reference": REFERENCE,
                                     "of_medians": ratio, "median_per_round": per_round_ratio}})


if __name__ == "__main__":
    main()
