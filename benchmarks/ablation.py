"""The synthetic ablation: Mobile-FRNet, no attention and MobileNetV2 on the same data and budget.

    .venv/bin/python -m benchmarks.ablation --out runs/ablation --markdown ablation.md --json ablation.json

Renders a synthetic 300W-LP-layout training set and an AFLW2000-3D-layout test set
(:mod:`preprocessing.synth`), preprocesses them once into shards
(:func:`preprocessing.ray_preprocess.run_preprocess`), then trains every ``--archs`` network
with :func:`pipeline.train.train`. The training configs differ only in ``model.arch``, the run
name and the registered model's name (``ablation-ARCH``, so the archs' champions never compete):
same seed, epochs, batch size, workers and optimiser. All runs share one MLflow store under
``--out``. ``train`` evaluates each best checkpoint on the AFLW2000-3D shards; a mean-face row
(the whitening mean, the average training label, predicted for every image) is the reference a
network has to beat.

Prints the paper's table layout (Li et al., ICPR 2020, AFLW2000-3D: params, "FLOPs", NME per
|yaw| bin, mean and std of the three bin means) plus each arch's training wall time. The
paper's "FLOPs" are multiply-adds counted once, so the column is MACs (see BENCHMARKS.md,
"Network size"). These are synthetic faces: the figures say how the archs compare on this data
and budget, not what they score on the real benchmark.

Out folder: ``data/`` (rendered images), ``shards/`` (Parquet), ``runs/`` (Ray Train runs,
``mlflow.db``, model files). Each invocation trains fresh runs (the run names carry the start
time): resuming an earlier run would make its wall time meaningless. ``--reuse-shards`` trains
again on the data of an earlier invocation.

The defaults (120 faces x 4 views x 2 flips x 2 crops: about 1,700 training rows; 8 epochs;
600 test images) are sized for about 5 minutes of training per arch on 2 CPU cores at about
50 training samples/s (BENCHMARKS.md, "Training throughput"); with Ray Train's start, the
per-epoch validation and checkpoints and the evaluation, about 7 minutes per arch and 20-25
minutes for the three on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from models.architectures import ARCHITECTURES, build_model, count_complexity
from models.face_models import load_face_model
from models.predictor import MeanFacePredictor
from pipeline.evaluation.scoring import score_shards
from pipeline.runtime.config import from_dict
from pipeline.runtime.stage_tools import progress_logger, setup_logging, write_json
from pipeline.runtime.tracking import TrackingTarget, metric_history
from pipeline.training.config import (
    DataConfig,
    LossConfig,
    MlflowConfig,
    OptimConfig,
    RunConfig,
    ScalingConfig,
    TrainConfig,
)
from pipeline.training.run import train
from preprocessing.augment import AugmentConfig
from preprocessing.dataflow import PreprocessConfig
from preprocessing.manifest import MANIFEST_FILE, Manifest, read_manifest
from preprocessing.ray_preprocess import run_preprocess
from preprocessing.synth import SynthConfig, generate

LOG = logging.getLogger("frnet.ablation")
ARCHS = ("mobile-frnet", "mobile-frnet-noatt", "mobilenet-v2")
ARCH_LABELS = {"mobile-frnet": "Mobile-FRNet", "mobile-frnet-noatt": "Mobile-FRNet w/o attention",
               "mobilenet-v2": "MobileNetV2", "mobilenet-v1": "MobileNetV1"}
BASELINE_LABEL = "Mean face (reference)"


# -- data -------------------------------------------------------------------------------------

def make_shards(out_dir: Path, args: argparse.Namespace) -> None:
    """Render the training and test sets under ``out_dir/data`` and preprocess them into
    ``out_dir/shards``."""
    workers = args.num_cpus or os.cpu_count() or 1
    train_config = SynthConfig("300w-lp", n=args.train_faces * args.views, seed=args.seed,
                               views_per_face=args.views)
    test_config = SynthConfig("aflw2000-3d", n=args.test_faces, seed=args.seed + 1)
    for config, folder in ((train_config, "300W_LP"), (test_config, "AFLW2000")):
        LOG.info("rendering %s (%s layout)", folder, config.layout)
        generate(config, out_dir / "data" / folder, workers=workers,
                 progress=progress_logger(LOG, f"synthetic {folder}"))
    LOG.info("preprocessing into %s", out_dir / "shards")
    run_preprocess(str(out_dir / "data" / "300W_LP"), str(out_dir / "shards"),
                   PreprocessConfig(augment=AugmentConfig(copies=args.copies), seed=args.seed),
                   aflw2000_root=str(out_dir / "data" / "AFLW2000"))


def data_summary(out_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """What the shards hold, read back from the files (so ``--reuse-shards`` reports the truth)."""
    synth = {folder: json.loads((out_dir / "data" / folder / "synth.json").read_text())
             for folder in ("300W_LP", "AFLW2000")}
    train = synth["300W_LP"]["config"]
    return {
        "train_faces": math.ceil(train["n"] / train["views_per_face"]),
        "views_per_face": train["views_per_face"],
        "flips": train["flip"],
        "train_images": synth["300W_LP"]["images"],
        "copies": manifest.config["augment"]["copies"],
        "rows": manifest.counts["rows"],
        "quarantined": manifest.counts["quarantined"],
        "test_images": manifest.aflw2000.counts["written"],
        "test_quarantined": manifest.aflw2000.counts["quarantined"],
        "synth": synth,
    }


def check_reused_sizes(data: dict[str, Any], args: argparse.Namespace) -> None:
    asked = {"train_faces": args.train_faces, "views_per_face": args.views, "copies": args.copies,
             "test_images": args.test_faces}
    for key, value in asked.items():
        if data[key] != value:
            LOG.warning("--reuse-shards: the shards hold %s = %s, not the %s asked for; "
                        "the report gives what the shards hold", key, data[key], value)


# -- the reference row ------------------------------------------------------------------------

def mean_face_report(shards: str, manifest: Manifest) -> dict[str, Any]:
    """AFLW2000-3D figures of predicting the whitening mean (the mean training label) for every
    image, through the training's own shard scoring (the network given is never run)."""
    model = load_face_model(manifest.morphable_model.source)
    baseline = MeanFacePredictor(build_model("mobile-frnet"), manifest.whitening, model)
    return score_shards(baseline, shards, manifest)


# -- training ---------------------------------------------------------------------------------

def optimiser(name: str, epochs: int) -> OptimConfig:
    """The shared recipe, scaled to a short budget: one warm-up epoch at 0.2x, then cosine
    (adamw, lr 2e-3, weight decay 0.01: the demo's recipe, configs/demo/train.yaml) or 3DDFA's SGD
    with its x0.2 steps at 60% and 80% of the epochs (its 30 and 40 of 50). In a 6-epoch check
    SGD's loss jumped when its warm-up ended at lr 0.02 and it ended behind AdamW."""
    warmup = 1 if epochs > 2 else 0
    if name == "adamw":
        return OptimConfig(name="adamw", lr=2e-3, weight_decay=0.01, warmup_epochs=warmup)
    return OptimConfig(name="sgd", warmup_epochs=warmup,
                       milestones=(round(0.6 * epochs), round(0.8 * epochs)))


def base_config(shards: Path, args: argparse.Namespace) -> TrainConfig:
    """The training config every arch shares; :func:`arch_config` sets the arch and names.
    Wing's weight is the demo's 0.01: in crop pixels Wing is ~100x WPDC early on."""
    config = TrainConfig(
        epochs=args.epochs, seed=args.seed, optim=optimiser(args.optim, args.epochs),
        loss=LossConfig(lambda2=0.01),
        data=DataConfig(shards=str(shards), batch_size=args.batch_size, cache_decoded=True),
        scaling=ScalingConfig(num_workers=args.workers),
        run=RunConfig(max_failures=0),  # a failure should show, not be retried into the wall time
        mlflow=MlflowConfig(experiment="ablation"),
    )
    # Built from flags, so checked as a file would be (ranges, names).
    return from_dict(TrainConfig, asdict(config), source="command line")


def arch_config(base: TrainConfig, arch: str, stamp: str) -> TrainConfig:
    return replace(base, model=replace(base.model, arch=arch),
                   run=replace(base.run, name=f"ablation-{arch}-{stamp}"),
                   mlflow=replace(base.mlflow, registered_model=f"ablation-{arch}"))


def steady_rate(rates: list[float]) -> float:
    """Training samples/s of the epochs after the first (which fills the pipelines), if any."""
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


def train_arch(config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Train one arch; its figures plus wall time and the training samples/s of each epoch."""
    started = time.perf_counter()
    figures = train(config, run_dir).to_json()
    wall = time.perf_counter() - started
    rates = metric_history(TrackingTarget(figures["tracking_uri"], figures["run_id"]), "samples_per_second")
    figures.update(wall_seconds=wall, samples_per_second=rates,
                   steady_samples_per_second=steady_rate(rates))
    return figures


def complexity(arch: str) -> dict[str, int]:
    return count_complexity(build_model(arch))


# -- the report -------------------------------------------------------------------------------

def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def table_row(label: str, report: dict[str, Any], params: int | None = None, macs: int | None = None,
              wall_seconds: float | None = None) -> str:
    """One markdown row: Method | Params (M) | MACs (G) | 3 bins | Mean | Std | Train wall (s)."""
    cells = [label, "-" if params is None else f"{params / 1e6:.2f}",
             "-" if macs is None else f"{macs / 1e9:.3f}",
             *(_percent(b["mean"]) for b in report["bins"]),
             _percent(report["nme_mean_of_bins"]), _percent(report["nme_std_of_bins"]),
             "-" if wall_seconds is None else f"{wall_seconds:.0f}"]
    return "| " + " | ".join(cells) + " |"


def results_table(results: dict[str, Any]) -> str:
    """The paper's AFLW2000-3D layout (NME %), the mean-face reference row last."""
    bins = results["baseline"]["bins"]
    lines = ["| Method | Params (M) | MACs (G) | " + " | ".join(b["range"] for b in bins)
             + " | Mean | Std | Train wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for arch, run in results["archs"].items():
        lines.append(table_row(ARCH_LABELS.get(arch, arch), run["aflw2000"], run["params"], run["macs"],
                               run["wall_seconds"]))
    lines.append(table_row(BASELINE_LABEL, results["baseline"]))
    return "\n".join(lines)


def report_header(results: dict[str, Any]) -> str:
    data, machine, recipe = results["data"], results["machine"], results["recipe"]
    bins = ", ".join(f"{b['range']} {b['count']}" for b in results["baseline"]["bins"])
    optim = recipe["optim"]
    return "\n".join([
        "**Synthetic faces, not the paper's benchmark.** Training and test images are rendered "
        "from the procedural synthetic head in the 300W-LP and AFLW2000-3D layouts; the figures "
        "compare the archs on this data and budget and are not comparable with the paper's table.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['ray_cpus']} given to Ray), "
        f"no GPU; Python {machine['python']}, torch {machine['torch']}; 1-min load average "
        f"{machine['load_before']:.2f} before / {machine['load_after']:.2f} after training.",
        f"Command: `{results['command']}`",
        f"Training data: {data['train_faces']} faces x {data['views_per_face']} views"
        f"{' x 2 (flips)' if data['flips'] else ''} = {data['train_images']} images, "
        f"{_count(data['copies'], 'crop')} each: {data['rows'].get('train', 0)} training and "
        f"{data['rows'].get('val', 0)} validation rows. Test: {data['test_images']} "
        f"AFLW2000-3D-layout images (by |yaw|: {bins}).",
        f"Recipe (the same for every arch): {_count(recipe['epochs'], 'epoch')}, seed {recipe['seed']}, "
        f"{recipe['scaling']['num_workers']} Ray Train workers x batch {recipe['data']['batch_size']}, "
        f"{optim['name']} lr {optim['lr']:g} (weight decay {optim['weight_decay']:g}, "
        f"{_count(optim['warmup_epochs'], 'warm-up epoch')}), "
        f"loss {recipe['loss']['lambda1']:g} WPDC + {recipe['loss']['lambda2']:g} Wing; "
        "the best epoch by validation NME is evaluated.",
        "NME in % of sqrt(w*h) of the ground-truth landmark box, per |yaw| bin; Mean and Std are "
        "the mean and population std of the bin means. MACs: multiply-adds of one 120x120 forward "
        "pass, what the paper's \"FLOPs\" column counts (BENCHMARKS.md, \"Network size\"). Train "
        "wall: the whole `train()` call (Ray Train start, epochs, checkpoints, evaluation, MLflow).",
    ])


def machine_info(ray_cpus: float) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "ray_cpus": ray_cpus, "python": platform.python_version(),
            "torch": torch.__version__, "load_before": os.getloadavg()[0]}


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


# -- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="everything goes under this folder")
    parser.add_argument("--train-faces", type=int, default=120, help="synthetic 300W-LP source faces")
    parser.add_argument("--views", type=int, default=4, help="profile views per face (x2 with flips)")
    parser.add_argument("--copies", type=int, default=2, help="augmented crops per image")
    parser.add_argument("--test-faces", type=int, default=600, help="AFLW2000-3D-layout test images")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per Ray Train worker")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--optim", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--archs", nargs="+", choices=list(ARCHITECTURES), default=list(ARCHS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started here (default: all)")
    parser.add_argument("--markdown", type=Path, help="write the header and table here")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--reuse-shards", action="store_true",
                        help="train on OUT/shards of an earlier run instead of rendering new data")
    args = parser.parse_args(argv)
    for name in ("train_faces", "views", "copies", "test_faces", "epochs", "batch_size", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def prepare_data(out_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    shards = out_dir / "shards"
    if args.reuse_shards and (shards / MANIFEST_FILE).exists():
        LOG.info("reusing %s", shards)
    elif (out_dir / "data").exists() or shards.exists():
        raise FileExistsError(f"{out_dir} already holds data: pass --reuse-shards to train on it "
                              "again, or choose a fresh --out")
    else:
        make_shards(out_dir, args)
    manifest = read_manifest(str(shards))
    data = data_summary(out_dir, manifest)
    if args.reuse_shards:
        check_reused_sizes(data, args)
    for split in ("train", "val"):
        if not data["rows"].get(split):
            raise ValueError(f"{shards}: the {split} split is empty ({data['rows']}); render more "
                             "--train-faces (10% of the faces go to validation)")
    return {"manifest": manifest, "data": data}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(out_dir, args)
    shards = out_dir / "shards"
    base = base_config(shards, args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, Any] = {"command": command_line(), "data": prepared["data"],
                               "recipe": asdict(base), "archs": {}}
    results["baseline"] = mean_face_report(str(shards), prepared["manifest"])
    LOG.info("mean-face reference: AFLW2000-3D NME %.2f%% (mean of yaw bins)",
             100 * results["baseline"]["nme_mean_of_bins"])
    results["machine"] = machine_info(ray.cluster_resources().get("CPU", 0))
    for index, arch in enumerate(args.archs, start=1):
        LOG.info("[%d/%d] training %s for %d epochs", index, len(args.archs), arch, args.epochs)
        run_figures = train_arch(arch_config(base, arch, stamp), out_dir / "runs")
        run_figures.update(complexity(arch))
        results["archs"][arch] = run_figures
        LOG.info("[%d/%d] %s: AFLW2000-3D NME %.2f%%, %.0f s in all, %.1f training samples/s",
                 index, len(args.archs), arch, 100 * run_figures["aflw2000"]["nme_mean_of_bins"],
                 run_figures["wall_seconds"], run_figures["steady_samples_per_second"])
    results["machine"]["load_after"] = os.getloadavg()[0]
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    # A Ray of its own (address="local"), not a cluster another job started on this machine.
    # The dashboard stays on: Ray Train's controller queries the state API it serves.
    ray.init(address="local", num_cpus=args.num_cpus, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        results = run(args)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        LOG.error("%s", err)
        return 1
    finally:
        ray.shutdown()
    text = report_header(results) + "\n\n" + results_table(results) + "\n"
    print("\n" + text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
