"""``frnet``: one subcommand per stage script in :mod:`pipeline`.

``frnet STAGE ARGS...`` runs ``python pipeline/STAGE.py ARGS...``; each stage owns its arguments.
"""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "synth": "render a synthetic dataset in the 300W-LP or AFLW2000-3D layout",
    "preprocess": "300W-LP -> augmented, labelled Parquet shards with Ray Data",
    "train": "train a network with Ray Train (DDP) on the shards, tracked in MLflow",
    "tune": "Ray Tune sweep of training runs (ASHA), tracked in MLflow; registers the best",
    "predict": "landmarks, pose and a mesh for images, from a registered model or a model file",
    "info": "parameter and operation counts of a registered network",
    "export": "export a network (and its checkpoint) to ONNX",
    "evaluate": "NME on AFLW2000-3D / AFLW by yaw bin, 3D reconstruction NME, pictures",
    "register": "register a model file or a released checkpoint in MLflow, through the evaluation gate",
    "demo": "the whole pipeline on the embedded default (synthetic data, local Ray and MLflow)",
}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: frnet STAGE [ARGS...]   (frnet STAGE --help for a stage's arguments)", "", "stages:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"frnet: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pipeline.{stage}")
    from pipeline.runtime.console import run_main

    return run_main(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
