"""Shards on S3-compatible object storage against the same shards on local disk: training's input
rate, preprocessing's write time, and the S3 requests one epoch makes.

    .venv/bin/python -m benchmarks.s3_input --images 3000 --cpus 2 --repeats 3 --json s3.json

The endpoint is moto's server (the dev extra's, as the S3 tests use it) on loopback, reached only
through the AWS variables, as MinIO or Ceph would be. It runs on the same cores as the pipeline,
so every request's server-side work is counted against S3: its CPU time over the S3 passes is
reported beside them. A 300W-LP-style tree of ``2 x
--images`` inputs (``preprocessing.linked_tree``) is, per round, alternating which goes first:

- **preprocessed** with the default config (four crops a source) to a local folder and to a
  bucket prefix, on a local Ray of ``--cpus`` CPUs (the whole ``run_preprocess``, its
  listing of the input tree included, which is local in both);
- **read** as training reads it (:func:`benchmarks.input_ceiling.ray_data`: training's own
  dataset iterated as torch batches by a consumer that does nothing) from the local shards and
  from the bucket's, over half the training files and over all of them: the epoch rate is the
  whole pass's rows over its time (what an epoch of training waits for, its start included);
  the streaming rate the difference in rows over the difference in time, the start what is left
  of the whole pass. A round whose whole pass took no longer than its half pass has no
  streaming rate (shown as n/a, left out of the median).

The requests are counted from the server's access log as a training run makes them: building
training's dataset once (the manifest read, Ray Data's look at the files), then each of two epochs
over it: object reads (GET), metadata lookups (HEAD) and listings (GET with ``list-type``), beside
the number of training files the manifest names.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from benchmarks.input_ceiling import BATCH, rate_and_start, ray_data

BUCKET = "frnet-bench"
REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP')


def ratio_text(ratio: float) -> str:
    return "n/a" if math.isnan(ratio) else f"{ratio:.2f}"


def median_of_known(values) -> float:
    """The median of the values that are not NaN (NaN where none is)."""
    known = [value for value in values if not math.isnan(value)]
    return statistics.median(known) if known else float("nan")


def start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port, logging every request to ``log_path``."""
    command = Path(sys.executable).parent / "moto_server"
    if not command.exists():
        sys.exit(f"{command} not found: this benchmark needs moto's server (pip install -e '.[dev]')")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        server = subprocess.Popen([str(command), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    sys.exit(f"the S3 server did not answer within 60 s; its log: {log_path}")


def requests(log_path: Path, skip: int) -> tuple[Counter, int, list[str]]:
    """Requests by kind in the server's log after its first ``skip`` lines, the line count, and
    the targets of the listings."""
    lines = log_path.read_text(errors="replace").splitlines()
    kinds: Counter = Counter()
    listings = []
    for line in lines[skip:]:
        found = REQUEST.search(line)
        if found is None:
            continue
        method, target = found.groups()
        listing = method == "GET" and "list-type" in target
        kinds["LIST" if listing else method] += 1
        if listing:
            listings.append(target)
    return kinds, len(lines), listings


def run_requests(shards: str, log_path: Path) -> list[tuple[str, Counter, list[str]]]:
    """The S3 requests of building training's dataset over ``shards``, then of each of two
    epochs over it: (what, requests by kind, listing targets)."""
    from pipeline.data.shard_reader import crops_per_source, split_dataset
    from pipeline.training.config import DataConfig
    from preprocessing.manifest import read_manifest

    _, mark, _ = requests(log_path, 0)
    manifest = read_manifest(shards)
    data = DataConfig(shards=shards, batch_size=BATCH)
    dataset = split_dataset(shards, manifest, data, seed=0, split="train")
    kinds, mark_after, listings = requests(log_path, mark)
    found = [("building the dataset", kinds, listings)]
    for epoch in (1, 2):
        for _ in dataset.iter_torch_batches(batch_size=BATCH, local_shuffle_seed=epoch,
                                            local_shuffle_buffer_size=data.shuffle_rows(crops_per_source(manifest))):
            pass
        kinds, next_mark, listings = requests(log_path, mark_after)
        found.append((f"epoch {epoch}", kinds, listings))
        mark_after = next_mark
    return found


def timed_preprocess(source: str, output: str) -> float:
    from preprocessing.dataflow import PreprocessConfig
    from preprocessing.ray_preprocess import run_preprocess

    started = time.perf_counter()
    run_preprocess(source, output, PreprocessConfig())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="unflipped images (x2 inputs, x4 crops)")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    import psutil
    import ray

    from pipeline.runtime.ray_session import start_ray
    from pipeline.runtime.stage_tools import write_json
    from preprocessing.linked_tree import link_300w_lp
    from preprocessing.manifest import read_manifest
    from preprocessing.synth import SynthConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server, url = start_server(root / "s3.log")
        try:
            os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_DEFAULT_REGION="us-east-1")
            import pyarrow.fs as pafs

            pafs.S3FileSystem(endpoint_override=url, allow_bucket_creation=True).create_dir(BUCKET)
            generate(SynthConfig("300w-lp", n=64, seed=0, views_per_face=4), root / "pool")
            link_300w_lp(root / "pool", root / "300W_LP", args.images)
            source = str(root / "300W_LP")
            start_ray(args.cpus, log_to_driver=False, logging_level="ERROR")
            ray.data.DataContext.get_current().enable_progress_bars = False
            timed_preprocess(source, str(root / "warm-up"))  # start Ray's workers and import
            shutil.rmtree(root / "warm-up")
            writes: dict[str, list[float]] = {"local": [], "s3": []}
            for round_ in range(args.repeats):
                order = ["local", "s3"] if round_ % 2 == 0 else ["s3", "local"]
                for where in order:
                    output = str(root / f"shards-{round_}") if where == "local" else f"s3://{BUCKET}/shards-{round_}"
                    writes[where].append(timed_preprocess(source, output))
                print(f"preprocess round {round_ + 1}: local {writes['local'][-1]:.1f} s, "
                      f"S3 {writes['s3'][-1]:.1f} s", flush=True)
            shards = {"local": str(root / "shards-0"), "s3": f"s3://{BUCKET}/shards-0"}
            manifest = read_manifest(shards["local"])
            files = len(manifest.splits["train"])
            half = files // 2
            reads: dict[str, list[tuple[float, float]]] = {"local": [], "s3": []}
            epochs: dict[str, list[float]] = {"local": [], "s3": []}
            serving = psutil.Process(server.pid)
            server_cpu, s3_seconds = 0.0, 0.0
            ray_data(shards["s3"], files)  # warm up both readers
            ray_data(shards["local"], files)
            for round_ in range(args.repeats):
                order = ["local", "s3"] if round_ % 2 == 0 else ["s3", "local"]
                for where in order:
                    cpu = sum(serving.cpu_times()[:2])
                    passes = [ray_data(shards[where], half), ray_data(shards[where], files)]
                    epochs[where].append(passes[1][0] / passes[1][1])
                    unknown = (float("nan"), float("nan"))
                    reads[where].append(rate_and_start(*passes) if passes[1][1] > passes[0][1] else unknown)
                    if where == "s3":
                        server_cpu += sum(serving.cpu_times()[:2]) - cpu
                        s3_seconds += passes[0][1] + passes[1][1]
                local, s3 = epochs["local"][-1], epochs["s3"][-1]
                streaming = ratio_text(reads["s3"][-1][0] / reads["local"][-1][0])
                print(f"read round {round_ + 1}: epoch local {local:,.0f}, S3 {s3:,.0f} samples/s "
                      f"({s3 / local:.2f}x); streaming {streaming}", flush=True)
            run = run_requests(shards["s3"], root / "s3.log")
            ray.shutdown()
            rows = manifest.counts["rows"]["train"]
        finally:
            server.kill()
            server.wait()
    rate = {where: median_of_known(r for r, _ in reads[where]) for where in reads}
    start = {where: median_of_known(s for _, s in reads[where]) for where in reads}
    ratios = [s3[0] / local[0] for s3, local in zip(reads["s3"], reads["local"], strict=True)]
    epoch = {where: statistics.median(values) for where, values in epochs.items()}
    epoch_ratios = [s3 / local for s3, local in zip(epochs["s3"], epochs["local"], strict=True)]
    write_time = {where: statistics.median(times) for where, times in writes.items()}
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; {args.cpus} CPUs for Ray; {rows} "
          f"training rows in {files} shard files; batch {BATCH}; medians of {args.repeats} rounds")
    print("| shards on | epoch samples/s | vs local | each round | streaming samples/s | vs local | "
          "each round | start |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| local disk | {epoch['local']:,.0f} | 1.00 | | {rate['local']:,.0f} | 1.00 | | "
          f"{start['local']:.1f} s |")
    print(f"| S3 (loopback) | {epoch['s3']:,.0f} | **{statistics.median(epoch_ratios):.2f}** | "
          f"{' '.join(f'{r:.2f}' for r in epoch_ratios)} | {rate['s3']:,.0f} | "
          f"{ratio_text(median_of_known(ratios))} | {' '.join(ratio_text(r) for r in ratios)} | "
          f"{start['s3']:.1f} s |")
    print(f"the S3 server's own CPU: {server_cpu / s3_seconds:.2f} cores on average over the S3 passes")
    print(f"\npreprocessing {2 * args.images} inputs: local {write_time['local']:.1f} s, "
          f"S3 {write_time['s3']:.1f} s ({write_time['local'] / write_time['s3']:.2f}x the local rate)")
    print(f"\nS3 requests of a training run over {files} training files:")
    for what, kinds, listings in run:
        counts = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items())) or "none"
        print(f"- {what}: {counts}" + (f" (listing {', '.join(listings)})" if listings else ""))
    write_json(args.json, {"rows": rows, "files": files, "epoch_rate": epoch, "epoch_ratios": epoch_ratios,
                           "rate": rate, "start": start, "ratios": ratios,
                           "preprocess_s": writes, "server_cores": server_cpu / s3_seconds,
                           "requests": [{"what": what, "requests": dict(kinds), "listings": listings}
                                        for what, kinds, listings in run]})


if __name__ == "__main__":
    main()
