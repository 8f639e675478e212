"""The input pipeline's ceiling: how many training samples per second per CPU Ray Data can read,
decode and hand over as torch batches, beside a bare loop doing the same reads and decodes.

    python benchmarks/input_ceiling.py --images 3000 --cpus 1 2 --repeats 3 --json ceiling.json

Shards: a tree laid out like 300W-LP (``preprocessing.linked_tree``) of ``2 x --images`` inputs,
preprocessed with the default config (four crops a source). Per CPU count N, alternating, each
``--repeats`` times over the training split:

- **(a)** bare loop: N processes, each reading whole shard files with pyarrow and decoding every
  crop with the same function training uses (``pipeline.shard_data.decode_batch``);
- **(b)** Ray Data on a local Ray of N CPUs: training's own dataset (``split_dataset``: file
  shuffle, read, decode tasks) iterated with ``iter_torch_batches`` (batch 128, the local shuffle
  buffer sized from the data) by a consumer that does nothing with the batches.

Then the network's forward + backward on this CPU (Mobile-FRNet, batch 128, one thread) for
scale: the rate one CPU core could train at, against what one CPU can feed.
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

BATCH = 128


def decode_file(args: tuple[str, str]) -> int:
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.shard_data import TRAINING_COLUMNS, decode_batch

    path, image_format = args
    table = pq.read_table(path, columns=TRAINING_COLUMNS)
    batch = {name: np.array(table.column(name).to_pylist(), dtype=object) for name in TRAINING_COLUMNS}
    return len(decode_batch(batch, image_format)["image"])


def bare_loop(paths: list[str], image_format: str, cpus: int) -> float:
    """Samples/s of N processes reading and decoding whole shard files."""
    with multiprocessing.get_context("spawn").Pool(cpus, initializer=_one_thread) as pool:
        pool.map(decode_file, [(paths[0], image_format)] * cpus)  # import and warm up
        started = time.perf_counter()
        rows = sum(pool.map(decode_file, [(path, image_format) for path in paths], chunksize=1))
        return rows / (time.perf_counter() - started)


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import cv2

    cv2.setNumThreads(1)


def ray_data(shards: str, cpus: int) -> float:
    """Samples/s of training's dataset iterated as torch batches by a consumer that does nothing."""
    import ray

    from pipeline.ray_runtime import start_ray
    from pipeline.shard_data import crops_per_source, split_dataset
    from pipeline.train_config import DataConfig
    from preprocessing.manifest import read_manifest

    start_ray(cpus, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    manifest = read_manifest(shards)
    data = DataConfig(shards=shards, batch_size=BATCH)
    dataset = split_dataset(shards, manifest, data, seed=0, split="train")
    rows = 0
    started = time.perf_counter()
    for batch in dataset.iter_torch_batches(batch_size=BATCH, local_shuffle_seed=0,
                                            local_shuffle_buffer_size=data.shuffle_rows(crops_per_source(manifest))):
        rows += len(batch["image"])
    rate = rows / (time.perf_counter() - started)
    ray.shutdown()
    return rate


def network_rate() -> float:
    """Samples/s of Mobile-FRNet's forward + backward + SGD step, batch 128, one CPU thread."""
    import torch

    from models.registry import build_model

    torch.set_num_threads(1)
    network = build_model("mobile-frnet")
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01)
    images = torch.rand(BATCH, 3, 120, 120)
    for steps in (1, 3):
        started = time.perf_counter()
        for _ in range(steps):
            loss = network(images).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return 3 * BATCH / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="unflipped images (x2 inputs, x4 crops)")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from pipeline.common import write_json
    from pipeline.ray_runtime import start_ray
    from preprocessing.dataflow import PreprocessConfig
    from preprocessing.linked_tree import link_300w_lp
    from preprocessing.ray_preprocess import run_preprocess
    from preprocessing.synth import SynthConfig, generate

    results: dict[int, dict[str, list[float]]] = {n: {"bare": [], "ray": []} for n in args.cpus}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(SynthConfig("300w-lp", n=64, seed=0, views_per_face=4), root / "pool")
        link_300w_lp(root / "pool", root / "300W_LP", args.images)
        start_ray(os.cpu_count(), log_to_driver=False, logging_level="ERROR")
        manifest = run_preprocess(str(root / "300W_LP"), str(root / "shards"), PreprocessConfig())
        import ray

        ray.shutdown()
        paths = [str(root / "shards" / name) for name in manifest.splits["train"]]
        for _ in range(args.repeats):
            for cpus in args.cpus:
                results[cpus]["bare"].append(bare_loop(paths, manifest.image_format, cpus))
                results[cpus]["ray"].append(ray_data(str(root / "shards"), cpus))
                print(f"{cpus} CPUs: bare {results[cpus]['bare'][-1]:.0f}, "
                      f"Ray Data {results[cpus]['ray'][-1]:.0f} samples/s", flush=True)
        train_rows = manifest.counts["rows"]["train"]
    forward_backward = network_rate()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; {train_rows} training rows "
          f"({len(paths)} shard files), batch {BATCH}; medians of {args.repeats} rounds")
    print("| CPUs | (a) bare loop | per CPU | (b) Ray Data | per CPU | (b)/(a) | each round |")
    print("|---|---|---|---|---|---|---|")
    table = []
    for cpus in args.cpus:
        bare, ray_rates = results[cpus]["bare"], results[cpus]["ray"]
        ratios = [r / b for r, b in zip(ray_rates, bare, strict=True)]
        row = {"cpus": cpus, "bare": statistics.median(bare), "ray": statistics.median(ray_rates),
               "ratio": statistics.median(ratios), "rounds": ratios}
        table.append(row)
        print(f"| {cpus} | {row['bare']:.0f} | {row['bare'] / cpus:.0f} | {row['ray']:.0f} | "
              f"{row['ray'] / cpus:.0f} | **{row['ratio']:.2f}** | {' '.join(f'{r:.2f}' for r in ratios)} |")
    print(f"\nMobile-FRNet forward + backward + step, batch {BATCH}, one thread: "
          f"{forward_backward:.0f} samples/s")
    write_json(args.json, {"train_rows": train_rows, "table": table, "network_cpu_rate": forward_backward})


if __name__ == "__main__":
    main()
