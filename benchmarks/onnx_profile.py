"""Where the batch-1 single-thread onnxruntime time of each regressor goes, per operator and part.

    .venv/bin/python -m benchmarks.onnx_profile --runs 500 --json onnx_profile.json

Each network is exported as :mod:`benchmarks.onnx_latency` exports it (BatchNorm statistics set
from one random batch; Mobile-FRNet both in its inference form and as trained), loaded with
the same session options plus onnxruntime's profiler (``enable_profiling``), warmed up, and run
``--runs`` times. The profiler records every node's kernel time; this script sums them per
operator type of the optimised graph and per part of the network, and divides by the runs, so
each figure is microseconds per inference. The parts come from the module each node was
exported from (the exporter names nodes after their module path): ``se`` (the Layer-level SE
modules), ``sge`` (the SGE modules), ``multi-scale`` (the hierarchical blocks' own nodes:
expansion, depthwise convs, additions, concatenation and projection), ``layout`` (the NCHW <->
blocked-layout conversions onnxruntime inserts, which belong to no module) and ``backbone``
(everything else). The profiler itself adds a few microseconds to every node, so small nodes
look dearer here than they are and the total exceeds the plain latency: this script says where
the time goes, :mod:`benchmarks.onnx_latency` how much there is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from torch import nn

from benchmarks.onnx_latency import (
    NETWORKS,
    calibrate_batchnorm,
    describe_processor,
    single_thread_session,
    time_runs,
)
from models.architectures import build_model
from models.frame import CROP_SIZE
from models.inference_form import inference_form
from models.mobile_frnet import HierarchicalInvertedResidual, SpatialGroupEnhance, SqueezeExcitation
from models.onnx_export import export_onnx
from pipeline.runtime.stage_tools import write_json

PARTS = ("backbone", "multi-scale", "sge", "se", "layout")
# Module types whose nodes make up a part; the innermost match wins.
PART_OF_MODULE = ((SpatialGroupEnhance, "sge"), (SqueezeExcitation, "se"),
                  (HierarchicalInvertedResidual, "multi-scale"))
LAYOUT_OPS = {"ReorderInput", "ReorderOutput"}


def module_scopes(model: nn.Module) -> list[tuple[str, str]]:
    """(exporter scope prefix, part) of every module that defines a part, innermost first.

    The TorchScript exporter names a node ``/<scope>/.../<scope>/OpType`` with one scope per
    module called on the way: a module's own attribute name, prefixed with its container's
    scope (``features.1.0`` inside ``features.1``) when its parent is a Sequential or a
    ModuleList. A plain ModuleList is never called, so it adds no scope of its own.
    """
    scope_of: dict[str, str] = {"": ""}
    prefix_of: dict[str, str] = {"": "/"}
    modules = dict(model.named_modules())
    scopes = []
    for name, module in modules.items():
        if not name:
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = modules[parent_name]
        container = isinstance(parent, (nn.Sequential, nn.ModuleList))
        scope_of[name] = f"{scope_of[parent_name]}.{attribute}" if container else attribute
        called = type(module) is not nn.ModuleList
        prefix_of[name] = (prefix_of[parent_name] + scope_of[name] + "/" if called
                           else prefix_of[parent_name])
        part = next((p for kind, p in PART_OF_MODULE if isinstance(module, kind)), None)
        if part is not None:
            scopes.append((prefix_of[name], part))
    return sorted(scopes, key=lambda scope: -len(scope[0]))


def part_of(names: list[str], op_type: str, scopes: list[tuple[str, str]]) -> str:
    """The part a node belongs to, from its own and its outputs' names."""
    if op_type in LAYOUT_OPS:
        return "layout"
    for name in names:
        for prefix, part in scopes:
            if name.startswith(prefix):
                return part
    return "backbone"


def profile_network(onnx_path: Path, image: np.ndarray, runs: int, warmup: int,
                    scopes: list[tuple[str, str]]) -> dict:
    """Kernel microseconds per inference by operator and by part, and the node counts."""
    with tempfile.TemporaryDirectory() as tmp:
        optimised = Path(tmp) / "optimised.onnx"
        session = single_thread_session(onnx_path, profile_prefix=Path(tmp) / "profile",
                                        optimised_path=optimised)
        nodes = {node.name: (node.op_type, part_of([node.name, *node.output], node.op_type, scopes))
                 for node in onnx.load(str(optimised)).graph.node}
        time_runs(session, image, warmup)
        latency = statistics.median(time_runs(session, image, runs))
        events = json.loads(Path(session.end_profiling()).read_text())
    # The profiler also recorded the warm-up runs: each node's last `runs` events are kept.
    per_node: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[event["name"].removesuffix("_kernel_time")].append(event["dur"])
    by_op: dict[str, float] = defaultdict(float)
    by_part: dict[str, float] = defaultdict(float)
    for name, durations in per_node.items():
        op_type, part = nodes.get(name, ("unknown", "backbone"))  # a node the graph names otherwise
        microseconds = sum(durations[-runs:]) / runs
        by_op[op_type] += microseconds
        by_part[part] += microseconds
    return {"nodes": len(nodes), "nodes_by_part": dict(Counter(p for _, p in nodes.values())),
            "nodes_by_op": dict(Counter(op for op, _ in nodes.values())),
            "kernel_us_by_op": dict(by_op), "kernel_us_by_part": dict(by_part),
            "kernel_us": sum(by_op.values()), "median_ms_while_profiling": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500, help="profiled runs per network")
    parser.add_argument("--warmup", type=int, default=100, help="untimed runs per network")
    labels = [label for label, _, _ in NETWORKS]
    parser.add_argument("--networks", nargs="+", default=labels, choices=labels)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0:
        parser.error(f"need --runs >= 1 and --warmup >= 0, got {args.runs} and {args.warmup}")
    image = np.random.default_rng(args.seed).standard_normal(
        (1, 3, CROP_SIZE, CROP_SIZE)).astype(np.float32)
    results = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for label, arch, inference in NETWORKS:
            if label not in args.networks:
                continue
            model = build_model(arch)
            calibrate_batchnorm(model, args.seed)
            path = export_onnx(model, Path(tmp) / f"{label}.onnx", inference=inference)
            exported = inference_form(model) if inference else model
            results[label] = profile_network(path, image, args.runs, args.warmup,
                                             module_scopes(exported))
    load_after = os.getloadavg()[0]
    print(f"processor: {describe_processor()}; onnxruntime {ort.__version__}, batch 1, one "
          f"thread, {args.runs} profiled runs; 1-min load average {load_before:.2f} before / "
          f"{load_after:.2f} after")
    print("\nKernel microseconds per inference by part (nodes after optimisation):\n")
    print("| network | " + " | ".join(PARTS) + " | all kernels | nodes |")
    print("|---|" + "---|" * (len(PARTS) + 2))
    for arch, result in results.items():
        cells = [f"{result['kernel_us_by_part'].get(p, 0.0):.0f} "
                 f"({result['nodes_by_part'].get(p, 0)})" for p in PARTS]
        print(f"| {arch} | " + " | ".join(cells)
              + f" | {result['kernel_us']:.0f} | {result['nodes']} |")
    print("\nKernel microseconds per inference by operator (node count):\n")
    op_types = sorted({op for r in results.values() for op in r["kernel_us_by_op"]},
                      key=lambda op: -max(r["kernel_us_by_op"].get(op, 0.0) for r in results.values()))
    print("| operator | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for op in op_types:
        cells = [f"{r['kernel_us_by_op'].get(op, 0.0):.0f} ({r['nodes_by_op'].get(op, 0)})"
                 for r in results.values()]
        print(f"| {op} | " + " | ".join(cells) + " |")
    write_json(args.json, {"onnxruntime": ort.__version__, "processor": describe_processor(),
                           "machine": platform.machine(), "runs": args.runs,
                           "load_average": {"before": load_before, "after": load_after},
                           "networks": results})


if __name__ == "__main__":
    main()
