"""The input pipeline's ceiling: how many training samples per second per CPU Ray Data can read,
decode and hand over as torch batches, beside a bare loop doing the same reads and decodes.

    python benchmarks/input_ceiling.py --images 12000 --cpus 1 2 --repeats 3 --json ceiling.json

Shards: a tree laid out like 300W-LP (``preprocessing.linked_tree``) of ``2 x --images`` inputs,
preprocessed with the default config (four crops a source). Per CPU count N, alternating, each
``--repeats`` times, over the first half of the training files and over all of them:

- **(a)** bare loop: N processes, each reading whole shard files with pyarrow and decoding every
  crop with the same function training uses (``pipeline.data.shard_reader.decode_batch``);
- **(b)** Ray Data on a local Ray of N CPUs: training's own dataset (``split_dataset``: file
  shuffle, read, decode tasks) iterated with ``iter_torch_batches`` (batch 128, the local shuffle
  buffer sized from the data) by a consumer that does nothing with the batches.

Each pass costs a start (Ray Data plans the epoch and fills the shuffle buffer before the first
batch; the pool hands out its first files) plus a time per sample. The two sizes separate them: the
rate is (rows of all - rows of half) / (time of all - time of half), and the start is what is left
of the whole pass. A training epoch pays the start once, so at 300W-LP's size (490k rows an epoch)
the rate is what decides how many CPUs a GPU needs; the start is reported beside it.

Then the network's forward + backward on this CPU (Mobile-FRNet, batch 128, one thread) for
scale: the rate one CPU core could train at, against what one CPU can feed.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

BATCH = 128
FULL_EPOCH_ROWS = 489_800  # 300W-LP's 122,450 inputs x four crops, the training split


def decode_file(args: tuple[str, str]) -> int:
    import pyarrow.parquet as pq

    from pipeline.data.shard_reader import TRAINING_COLUMNS, decode_batch

    path, image_format = args
    table = pq.read_table(path, columns=TRAINING_COLUMNS)
    batch = {name: table.column(name).to_numpy() for name in TRAINING_COLUMNS}
    return len(decode_batch(batch, image_format)["image"])


def bare_loop(pool, paths: list[str], image_format: str) -> tuple[int, float]:
    """(rows, seconds) of the pool's processes reading and decoding whole shard files."""
    started = time.perf_counter()
    rows = sum(pool.map(decode_file, [(path, image_format) for path in paths], chunksize=1))
    return rows, time.perf_counter() - started


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import cv2

    cv2.setNumThreads(1)


def ray_data(shards: str, files: int) -> tuple[int, float]:
    """(rows, seconds) of training's dataset over its first ``files`` training files, iterated
    as torch batches by a consumer that does nothing."""
    from pipeline.data.shard_reader import crops_per_source, split_dataset
    from pipeline.training.config import DataConfig
    from preprocessing.manifest import read_manifest

    manifest = read_manifest(shards)
    first_files = manifest.splits["train"][:files]
    manifest = dataclasses.replace(manifest, splits={**manifest.splits, "train": first_files})
    data = DataConfig(shards=shards, batch_size=BATCH)
    dataset = split_dataset(shards, manifest, data, seed=0, split="train")
    rows = 0
    started = time.perf_counter()
    for batch in dataset.iter_torch_batches(batch_size=BATCH, local_shuffle_seed=0,
                                            local_shuffle_buffer_size=data.shuffle_rows(crops_per_source(manifest))):
        rows += len(batch["image"])
    return rows, time.perf_counter() - started


def rate_and_start(half: tuple[int, float], whole: tuple[int, float]) -> tuple[float, float]:
    """Samples/s beyond the start, and the start in seconds, from passes over two sizes."""
    rate = (whole[0] - half[0]) / max(whole[1] - half[1], 1e-9)
    return rate, max(whole[1] - whole[0] / rate, 0.0)


def network_rate() -> float:
    """Samples/s of Mobile-FRNet's forward + backward + SGD step, batch 128, one CPU thread."""
    import torch

    from models.architectures import build_model

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
    parser.add_argument("--images", type=int, default=12000, help="unflipped images (x2 inputs, x4 crops)")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from pipeline.runtime.ray_session import start_ray
    from pipeline.runtime.stage_tools import write_json
    from preprocessing.dataflow import PreprocessConfig
    from preprocessing.linked_tree import link_300w_lp
    from preprocessing.ray_preprocess import run_preprocess
    from preprocessing.synth import SynthConfig, generate

    results: dict[int, dict[str, list]] = {n: {"bare": [], "ray": []} for n in args.cpus}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(SynthConfig("300w-lp", n=64, seed=0, views_per_face=4), root / "pool")
        link_300w_lp(root / "pool", root / "300W_LP", args.images)
        start_ray(os.cpu_count(), log_to_driver=False, logging_level="ERROR")
        shards = str(root / "shards")
        manifest = run_preprocess(str(root / "300W_LP"), shards, PreprocessConfig())
        import ray

        ray.shutdown()
        paths = [str(root / "shards" / name) for name in manifest.splits["train"]]
        half = len(paths) // 2
        for _ in range(args.repeats):
            for cpus in args.cpus:
                with multiprocessing.get_context("spawn").Pool(cpus, initializer=_one_thread) as pool:
                    bare_loop(pool, paths, manifest.image_format)  # import, warm up
                    passes = [bare_loop(pool, paths[:half], manifest.image_format),
                              bare_loop(pool, paths, manifest.image_format)]
                results[cpus]["bare"].append(rate_and_start(*passes))
                start_ray(cpus, log_to_driver=False, logging_level="ERROR")
                ray.data.DataContext.get_current().enable_progress_bars = False
                ray_data(shards, len(paths))  # start Ray's workers and import, as a training run has
                passes = [ray_data(shards, half), ray_data(shards, len(paths))]
                results[cpus]["ray"].append(rate_and_start(*passes))
                ray.shutdown()
                (bare, _), (rate, start) = results[cpus]["bare"][-1], results[cpus]["ray"][-1]
                print(f"{cpus} CPUs: bare {bare:.0f}, Ray Data {rate:.0f} samples/s "
                      f"(start {start:.1f} s)", flush=True)
        train_rows = manifest.counts["rows"]["train"]
    forward_backward = network_rate()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; {train_rows} training rows "
          f"({len(paths)} shard files, half: {half}), batch {BATCH}; medians of {args.repeats} rounds")
    print("| CPUs | (a) bare loop | per CPU | (b) Ray Data | per CPU | (b)/(a) | each round "
          "| Ray Data start | (b)/(a) over a 300W-LP epoch |")
    print("|---|---|---|---|---|---|---|---|---|")
    table = []
    for cpus in args.cpus:
        bare = [rate for rate, _ in results[cpus]["bare"]]
        ray_rates = [rate for rate, _ in results[cpus]["ray"]]
        ratios = [r / b for r, b in zip(ray_rates, bare, strict=True)]
        row = {"cpus": cpus, "bare": statistics.median(bare), "ray": statistics.median(ray_rates),
               "ratio": statistics.median(ratios), "rounds": ratios,
               "ray_start_s": statistics.median(start for _, start in results[cpus]["ray"])}
        epoch = FULL_EPOCH_ROWS / row["bare"], row["ray_start_s"] + FULL_EPOCH_ROWS / row["ray"]
        row["full_epoch_ratio"] = epoch[0] / epoch[1]
        table.append(row)
        print(f"| {cpus} | {row['bare']:,.0f} | {row['bare'] / cpus:,.0f} | {row['ray']:,.0f} | "
              f"{row['ray'] / cpus:,.0f} | **{row['ratio']:.2f}** | {' '.join(f'{r:.2f}' for r in ratios)} "
              f"| {row['ray_start_s']:.1f} s | {row['full_epoch_ratio']:.2f} |")
    print(f"\nMobile-FRNet forward + backward + step, batch {BATCH}, one thread: "
          f"{forward_backward:.0f} samples/s")
    write_json(args.json, {"train_rows": train_rows, "table": table, "network_cpu_rate": forward_backward})


if __name__ == "__main__":
    main()
