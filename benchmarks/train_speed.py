"""Training throughput: Ray Data + Ray Train against a bare PyTorch loop over the same samples.

    python benchmarks/train_speed.py --images 1000 --epochs 3 --json train_speed.json

One process tree, one synthetic shard set. (a) a plain loop over the training rows already
decoded in memory; (b) ``frnet train`` with one Ray Train worker reading the shards through Ray
Data, decoding the JPEG crops every epoch; (c) the same with ``data.cache_decoded`` (decoded once
into Ray's object store, like (a)'s rows in memory). Same network (Mobile-FRNet), loss,
optimiser, batch size and torch threads (1). Reports training samples/s after the first epoch
(warm-up) and the ratios to (a); goal >= 0.85 on CPU.

A Ray Data epoch pays a fixed start (the executor starts, and the shuffle buffer fills before the
first batch) of one to two seconds on a 2-core machine; with a few hundred rows an epoch that
fixed part decides the ratio, so the default set (1000 images and their flips, about 1800
training rows) is sized to show the per-row rate a real epoch sees.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 32


def bare_loop(shards: Path, epochs: int) -> float:
    """Samples/s of epochs 2.. of a plain loop over decoded, in-memory training rows."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from models.architectures import build_model
    from models.face_models import load_face_model
    from models.frame import normalise_input
    from models.losses import FRNetLoss
    from pipeline.data.shard_reader import TRAINING_COLUMNS, decode_batch
    from pipeline.training.config import OptimConfig
    from pipeline.training.worker import make_optimizer
    from preprocessing.manifest import read_manifest

    torch.set_num_threads(1)
    manifest = read_manifest(str(shards))
    table = pq.read_table([str(shards / p) for p in manifest.splits["train"]], columns=TRAINING_COLUMNS)
    rows = decode_batch({k: np.array(table.column(k).to_pylist(), dtype=object) for k in table.column_names},
                        manifest.image_format)
    images, labels = torch.from_numpy(rows["image"]), torch.from_numpy(rows["label"])
    stats = manifest.whitening
    mean, std = torch.tensor(stats.mean, dtype=torch.float32), torch.tensor(stats.std, dtype=torch.float32)
    network = build_model("mobile-frnet")
    optimizer = make_optimizer(network, OptimConfig(), OptimConfig().lr)
    loss_fn = FRNetLoss(1.0, 0.05, stats, load_face_model(manifest.morphable_model.source))
    generator = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(images))
        for start in range(0, len(images), BATCH):
            index = order[start:start + BATCH]
            prediction = network(normalise_input(images[index]))
            parts = loss_fn(prediction, (labels[index] - mean) / std, generator)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            optimizer.step()
        rates.append(len(images) / (time.perf_counter() - started))
    return float(np.mean(rates[1:]))


def ray_train(shards: Path, run_dir: Path, epochs: int, cache_decoded: bool) -> float:
    import ray

    from pipeline.runtime.ray_session import start_ray
    from pipeline.training.config import DataConfig, RunConfig, ScalingConfig, TrainConfig
    from pipeline.training.run import train

    start_ray(2, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = TrainConfig(epochs=epochs, data=DataConfig(shards=str(shards), batch_size=BATCH,
                                                        cache_decoded=cache_decoded),
                         scaling=ScalingConfig(num_workers=1, cpus_per_worker=0.4),
                         run=RunConfig(name=f"speed-cache-{cache_decoded}", max_failures=0))
    figures = train(config, run_dir).to_json()
    import mlflow

    history = mlflow.MlflowClient(figures["tracking_uri"]).get_metric_history(figures["run_id"],
                                                                             "samples_per_second")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    ray.shutdown()
    return sum(rates[1:]) / len(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="unflipped synthetic images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from pipeline.runtime.stage_tools import write_json
    from preprocessing.manifest import read_manifest
    from preprocessing.synth import SynthConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(SynthConfig("300w-lp", n=args.images, seed=0), root / "300W_LP", workers=os.cpu_count() or 1)
        (root / "preprocess.yaml").write_text("augment:\n  copies: 1\n")  # one crop an image
        subprocess.run([sys.executable, "-m", "pipeline.cli", "preprocess", "--input", str(root / "300W_LP"),
                        "--output", str(root / "shards"), "--config", str(root / "preprocess.yaml")],
                       check=True, capture_output=True)
        train_rows = read_manifest(str(root / "shards")).counts["rows"]["train"]
        bare = bare_loop(root / "shards", args.epochs)
        ray_rate = ray_train(root / "shards", root / "run", args.epochs, cache_decoded=False)
        cached_rate = ray_train(root / "shards", root / "run", args.epochs, cache_decoded=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; Mobile-FRNet, batch {BATCH}, "
          f"1 torch thread; {train_rows} training rows an epoch")
    print("| loop | training samples/s |\n|---|---|")
    print(f"| (a) bare PyTorch, rows in memory | {bare:.1f} |")
    print(f"| (b) Ray Data + Ray Train, 1 worker | {ray_rate:.1f} |")
    print(f"| (c) as (b), decoded once into the object store (data.cache_decoded) | {cached_rate:.1f} |")
    print(f"(b)/(a) = {ray_rate / bare:.2f}; (c)/(a) = {cached_rate / bare:.2f}")
    write_json(args.json, {"bare_loop": bare, "ray_train": ray_rate, "ratio": ray_rate / bare,
                           "ray_train_cached": cached_rate, "ratio_cached": cached_rate / bare,
                           "batch": BATCH, "train_rows": train_rows})


if __name__ == "__main__":
    main()
