"""What each part of Mobile-FRNet costs in batch-1 single-thread onnxruntime latency.

    .venv/bin/python -m benchmarks.onnx_parts --runs 300

Mobile-FRNet is exported whole and with its SGE modules, its SE modules or both replaced by
identities (the last is the no-attention network), beside MobileNetV2 (no multi-scale stages
either) and 3DDFA_V2's MobileNetV1; all in their inference form, timed as
:mod:`benchmarks.onnx_latency` times them (interleaved rounds, the same session options). The
difference between two rows is what the removed part costs, in real latency rather than in the
profiler's kernel times (:mod:`benchmarks.onnx_profile`, which add the profiler's own cost to
every node). The networks without a part are for measurement only: they are not trained.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
from torch import nn

from benchmarks.onnx_latency import (
    REFERENCE,
    calibrate_batchnorm,
    describe_processor,
    interleaved_times,
    single_thread_session,
    time_runs,
)
from models.architectures import build_model
from models.frame import CROP_SIZE
from models.inference_form import replace_modules
from models.mobile_frnet import SpatialGroupEnhance, SqueezeExcitation
from models.onnx_export import export_onnx


def without(model: nn.Module, *kinds: type[nn.Module]) -> nn.Module:
    """A copy of ``model`` with every module of the given types replaced by an identity."""
    return replace_modules(model, kinds, lambda _: nn.Identity())


def networks(seed: int) -> dict[str, nn.Module]:
    """The networks timed, by label, with calibrated batch norms."""
    models = {}
    for arch in ("mobile-frnet", "mobilenet-v2", REFERENCE):
        models[arch] = build_model(arch)
        calibrate_batchnorm(models[arch], seed)
    full = models["mobile-frnet"]
    return {"mobile-frnet": full,
            "without SGE": without(full, SpatialGroupEnhance),
            "without SE": without(full, SqueezeExcitation),
            "without SGE and SE": without(full, SpatialGroupEnhance, SqueezeExcitation),
            "mobilenet-v2": models["mobilenet-v2"], REFERENCE: models[REFERENCE]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="timed runs per network (>= 200)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=50, help="untimed runs per network")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.runs < 200 or not 1 <= args.rounds <= args.runs or args.warmup < 0:
        parser.error(f"need --runs >= 200, 1 <= --rounds <= --runs, --warmup >= 0; got "
                     f"{args.runs}, {args.rounds}, {args.warmup}")
    image = np.random.default_rng(args.seed).standard_normal(
        (1, 3, CROP_SIZE, CROP_SIZE)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for index, (label, model) in enumerate(networks(args.seed).items()):
            sessions[label] = single_thread_session(export_onnx(model, Path(tmp) / f"{index}.onnx"))
            time_runs(sessions[label], image, args.warmup)
        load_before = os.getloadavg()[0]
        rounds = interleaved_times(sessions, image, args.runs, args.rounds, round_warmup=5)
        load_after = os.getloadavg()[0]
    medians = {label: statistics.median(t for r in rounds for t in r[label]) for label in sessions}
    print(f"processor: {describe_processor()}; batch 1, one thread, {args.rounds} interleaved "
          f"rounds; 1-min load average {load_before:.2f} before / {load_after:.2f} after")
    print(f"| network | median ms | vs {REFERENCE} | part removed costs (ms) |")
    print("|---|---|---|---|")
    full = medians["mobile-frnet"]
    for label, median in medians.items():
        saved = f"{full - median:.3f}" if label.startswith("without") else "-"
        print(f"| {label} | {median:.3f} | {median / medians[REFERENCE]:.3f} | {saved} |")


if __name__ == "__main__":
    main()
