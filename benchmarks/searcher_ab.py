"""Random search against Optuna's TPE on the demo's synthetic sweep, at an equal budget.

    .venv/bin/python -m benchmarks.searcher_ab --out runs/searcher-ab --markdown searcher_ab.md

Renders a synthetic 300W-LP-layout training set and an AFLW2000-3D-layout test set (the demo's
generator, ``--train-faces`` x ``--views`` images, data seed ``--seed``), preprocesses them once
with the demo's preprocessing config, then runs the demo's sweep (``configs/demo/tune.yaml``:
the demo's training config, two-worker trials; ``tune_spaces/small.yaml``'s keys and ranges)
twice through ``frnet tune``: ``searcher: random`` and ``searcher: optuna``, each seeded with
``--searcher-seed``, with the same number of trials and epochs per trial and the FIFO scheduler
(no early stopping), so both spend exactly ``trials x epochs`` epochs. On 2 CPUs a two-worker
trial runs alone, so each trial's values are chosen knowing every earlier trial's NME.

Reports, for each searcher, the best validation NME found and the best NME after each quarter
of the trials (in the order they started), and each sweep's wall time. One searcher seed and one
data seed: a single draw, not a distribution; differences of a few hundredths of a percent are
within what another seed would change.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import ray
import yaml

from pipeline import tune
from pipeline.runtime.config import load_config
from pipeline.runtime.stage_tools import progress_logger, setup_logging, write_json
from preprocessing.dataflow import PreprocessConfig
from preprocessing.ray_preprocess import run_preprocess
from preprocessing.synth import SynthConfig, generate

LOG = logging.getLogger("frnet.searcher_ab")
REPO = Path(__file__).resolve().parents[1]
SEARCHERS = ("random", "optuna")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/searcher-ab"))
    parser.add_argument("--train-faces", type=int, default=75, help="synthetic faces (x --views images)")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--test-faces", type=int, default=40)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="per trial")
    parser.add_argument("--startup-trials", type=int, default=3, help="TPE's random trials first")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--searcher-seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--reuse-shards", action="store_true", help="keep OUT/shards from an earlier run")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def make_shards(out: Path, args: argparse.Namespace) -> Path:
    shards = out / "shards"
    if args.reuse_shards and (shards / "manifest.json").exists():
        return shards
    datasets = ((SynthConfig("300w-lp", n=args.train_faces * args.views, seed=args.seed,
                             views_per_face=args.views), "300W_LP"),
                (SynthConfig("aflw2000-3d", n=args.test_faces, seed=args.seed + 1), "AFLW2000"))
    for config, folder in datasets:
        generate(config, out / "data" / folder, workers=args.num_cpus,
                 progress=progress_logger(LOG, f"synthetic {folder}"))
    preprocess = load_config(REPO / "configs" / "demo" / "preprocess.yaml", PreprocessConfig)
    run_preprocess(str(out / "data" / "300W_LP"), str(shards), preprocess,
                   aflw2000_root=str(out / "data" / "AFLW2000"))
    return shards


def sweep_files(out: Path, searcher: str, args: argparse.Namespace) -> tuple[Path, Path]:
    """The demo's sweep config and space with this searcher, the budget and FIFO."""
    sweep = yaml.safe_load((REPO / "configs" / "demo" / "tune.yaml").read_text())
    sweep.update(name=f"ab-{searcher}", epochs=args.epochs, register=False,
                 train_config=str(REPO / "configs" / "demo" / "train.yaml"))
    space = yaml.safe_load((REPO / "tune_spaces" / "small.yaml").read_text())
    space.update(num_samples=args.trials, scheduler={"name": "fifo"},
                 searcher={"name": searcher, "seed": args.searcher_seed,
                           "startup_trials": args.startup_trials})
    folder = out / "configs" / searcher
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tune.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    (folder / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    return folder / "tune.yaml", folder / "space.yaml"


def run_sweep(out: Path, shards: Path, searcher: str, args: argparse.Namespace) -> dict[str, Any]:
    config, space = sweep_files(out, searcher, args)
    figures_path = out / f"{searcher}.json"
    started = time.perf_counter()
    code = tune.main(["--config", str(config), "--space", str(space), "--shards", str(shards),
                      "--run-dir", str(out / "runs"), "--json", str(figures_path)])
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"the {searcher} sweep failed (exit {code})")
    figures = json.loads(figures_path.read_text())
    client = mlflow.MlflowClient(figures["tracking_uri"])
    ordered = sorted(figures["trials"], key=lambda t: client.get_run(t["mlflow_run_id"]).info.start_time)
    nmes = [t["best"][1] if t["best"] else math.inf for t in ordered]
    quarters = [max(1, round(args.trials * q / 4)) for q in (1, 2, 3, 4)]
    return {"searcher": searcher, "seconds": round(seconds), "best_val_nme": min(nmes),
            "best_after": {n: min(nmes[:n]) for n in quarters},
            "trials": [{"searched": t["searched"], "best_val_nme": nme}
                       for t, nme in zip(ordered, nmes, strict=True)]}


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    quarters = list(results[0]["best_after"])
    lines = [f"`{command}`", "",
             f"{args.trials} trials x {args.epochs} epochs per searcher (FIFO), demo sweep keys "
             f"(tune_spaces/small.yaml), {args.train_faces * args.views} synthetic training images "
             f"(data seed {args.seed}), searcher seed {args.searcher_seed}, TPE after "
             f"{args.startup_trials} random trials; {platform.processor() or platform.machine()}, "
             f"{args.num_cpus} CPUs. One seed: a single draw.", "",
             "| searcher | best val NME | " + " | ".join(f"best after {n} trials" for n in quarters)
             + " | sweep wall time |",
             "|---|---|" + "---|" * len(quarters) + "---|"]
    for result in results:
        after = " | ".join(f"{100 * result['best_after'][n]:.3f}%" for n in quarters)
        lines.append(f"| {result['searcher']} | {100 * result['best_val_nme']:.3f}% | {after} | "
                     f"{result['seconds']} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    words = [".venv/bin/python", "-m", "benchmarks.searcher_ab", *sys.argv[1:]]
    command = " ".join(shlex.quote(word) for word in words)
    args.out.mkdir(parents=True, exist_ok=True)
    # A Ray of its own (address="local"), not a cluster another job started on this machine.
    ray.init(address="local", num_cpus=args.num_cpus, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        shards = make_shards(args.out, args)
        results = [run_sweep(args.out, shards, searcher, args) for searcher in SEARCHERS]
    finally:
        ray.shutdown()
    table = markdown(results, args, command)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    write_json(args.json, {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
