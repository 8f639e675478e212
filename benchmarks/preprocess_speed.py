"""Preprocessing throughput: the plain decode + crop loop against the full Ray Data run.

    python benchmarks/preprocess_speed.py --n 300 --json preprocess_speed.json

On one synthetic 300W-LP folder, in one process tree, for 1 and 2 CPUs:
(a) read + JPEG decode + landmark-rule crop + resize to 120x120 in a plain loop (N processes),
    the practical limit of any preprocessing, with as many crops per image as (b) writes;
(b) ``frnet preprocess`` with Ray Data (label, augment, encode, Parquet, statistics), once with
    one crop per image (the same work as (a) plus labels and shards) and once with the default
    four augmented crops.
For (b) two rates: the whole run (``run_preprocess`` from call to manifest, including starting
the Ray actors, a few seconds once per run) and the working rate: source images over the span
from the first shard task's start to the last one's end (each shard records both), which is
what a large dataset sees. Prints images/s (source images), the ratios (b)/(a) and
2-CPU / 1-CPU, and bytes per image.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from pipeline.common import write_json  # noqa: E402


def _plain_worker(paths: list[tuple[str, str]], copies: int = 1) -> int:
    import cv2

    from preprocessing.annotations import decode_image, parse_mat
    from preprocessing.geometry import crop_image, landmark_crop_box

    cv2.setNumThreads(1)
    for jpg, mat in paths:
        image = decode_image(Path(jpg).read_bytes(), jpg)
        annotation = parse_mat(Path(mat).read_bytes(), mat)
        box = landmark_crop_box(annotation.pt2d)
        for _ in range(copies):  # the crop + resize work of each crop the run writes
            crop_image(image, box)
    return len(paths)


def plain_loop(pairs: list[tuple[str, str]], cpus: int, copies: int) -> float:
    """Source images/s of the plain loop over ``pairs`` (``copies`` crops each) on ``cpus`` processes."""
    chunks = [pairs[i::cpus] for i in range(cpus)]
    with multiprocessing.get_context("spawn").Pool(cpus) as pool:
        pool.starmap(_plain_worker, [(chunk[:2], copies) for chunk in chunks])  # warm-up: imports
        started = time.perf_counter()
        done = sum(pool.starmap(_plain_worker, [(chunk, copies) for chunk in chunks]))
        return done / (time.perf_counter() - started)


RAY_RUN = """
import json, logging, sys, time
import ray
from preprocessing.augment import AugmentConfig
from preprocessing.dataflow import PreprocessConfig
from preprocessing.ray_preprocess import run_preprocess
source, output, cpus, copies = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
ray.data.DataContext.get_current().enable_progress_bars = False
config = PreprocessConfig(augment=AugmentConfig(copies=copies))
started = time.perf_counter()
manifest = run_preprocess(source, output, config)
print(json.dumps({"seconds": time.perf_counter() - started, "inputs": manifest["counts"]["inputs"]}))
"""


def ray_run(source: Path, output: Path, cpus: int, copies: int) -> tuple[int, float]:
    """(source images, seconds) of one preprocessing run in a fresh Ray."""
    command = [sys.executable, "-c", RAY_RUN, str(source), str(output), str(cpus), str(copies)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return figures["inputs"], figures["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="unflipped synthetic images (x2 with flips)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from preprocessing.datasets import list_300w_lp, resolve
    from preprocessing.ray_preprocess import mean_bytes_per_image
    from preprocessing.synth import SynthConfig, generate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "300W_LP"
        generate(SynthConfig("300w-lp", n=args.n, seed=0), source, workers=os.cpu_count() or 1)
        _, refs = list_300w_lp(source)
        pairs = [(r.image_path, r.mat_path) for r in refs]
        for cpus in (1, 2):
            row = {"cpus": cpus, "images": len(pairs)}
            for copies in (1, 4):
                row[f"plain_loop_copies_{copies}"] = plain_loop(pairs, cpus, copies)
                output = Path(tmp) / f"shards-{cpus}-{copies}"
                n_all, t_all = ray_run(source, output, cpus, copies)
                records = [json.loads(p.read_text()) for p in (output / "_shards").glob("*.json")]
                span = max(r["finished_at"] for r in records) - min(r["started_at"] for r in records)
                row[f"ray_copies_{copies}_whole_run"] = n_all / t_all
                row[f"ray_copies_{copies}"] = n_all / span
                row[f"ray_copies_{copies}_start_seconds"] = t_all - span
                row[f"bytes_per_image_copies_{copies}"] = mean_bytes_per_image(*resolve(str(output)))
            rows.append(row)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {rows[0]['images']} source images")
    print("| CPUs | crops | (a) plain loop | (b) working | (b)/(a) | (b) whole run | outside the span, s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for copies in (1, 4):
            plain, ray_rate = row[f"plain_loop_copies_{copies}"], row[f"ray_copies_{copies}"]
            whole, start = row[f"ray_copies_{copies}_whole_run"], row[f"ray_copies_{copies}_start_seconds"]
            print(f"| {row['cpus']} | {copies} | {plain:.0f} | {ray_rate:.0f} | {ray_rate / plain:.2f} | "
                  f"{whole:.0f} | {start:.1f} |")
    for key in ("plain_loop_copies_1", "plain_loop_copies_4", "ray_copies_1", "ray_copies_4"):
        print(f"2 CPUs / 1 CPU, {key}: {rows[1][key] / rows[0][key]:.2f}x")
    print(f"bytes per stored image (JPEG q95): {rows[0]['bytes_per_image_copies_4']:.0f}")
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
