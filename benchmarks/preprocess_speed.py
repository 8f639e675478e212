"""Preprocessing throughput: the plain decode + crop loop against the full Ray Data run.

    python benchmarks/preprocess_speed.py --n 300 --json preprocess_speed.json

On one synthetic 300W-LP folder, in one process tree, for 1 and 2 CPUs:
(a) read + JPEG decode + landmark-rule crop + resize to 120x120 in a plain loop (N processes),
    the practical limit of any preprocessing;
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


def _plain_worker(paths: list[tuple[str, str]]) -> int:
    import cv2

    from preprocessing.annotations import decode_image, parse_mat
    from preprocessing.geometry import crop_image, landmark_crop_box

    cv2.setNumThreads(1)
    for jpg, mat in paths:
        image = decode_image(Path(jpg).read_bytes(), jpg)
        annotation = parse_mat(Path(mat).read_bytes(), mat)
        crop_image(image, landmark_crop_box(annotation.pt2d))
    return len(paths)


def plain_loop(pairs: list[tuple[str, str]], cpus: int) -> float:
    """Images/s of the plain loop over ``pairs`` split across ``cpus`` processes."""
    chunks = [pairs[i::cpus] for i in range(cpus)]
    with multiprocessing.get_context("spawn").Pool(cpus) as pool:
        pool.map(_plain_worker, [chunk[:2] for chunk in chunks])  # warm-up: imports
        started = time.perf_counter()
        done = sum(pool.map(_plain_worker, chunks))
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
            plain = plain_loop(pairs, cpus)
            row = {"cpus": cpus, "images": len(pairs), "plain_loop": plain}
            for copies in (1, 4):
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
    print("| CPUs | (a) plain loop | (b) 1 crop, working | (b)/(a) | (b) 1 crop, whole run "
          "| (b) 4 crops, working | (b)/(a) | (b) 4 crops, whole run | outside the span, s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['cpus']} | {row['plain_loop']:.0f} | {row['ray_copies_1']:.0f} | "
              f"{row['ray_copies_1'] / row['plain_loop']:.2f} | {row['ray_copies_1_whole_run']:.0f} | "
              f"{row['ray_copies_4']:.0f} | {row['ray_copies_4'] / row['plain_loop']:.2f} | "
              f"{row['ray_copies_4_whole_run']:.0f} | {row['ray_copies_4_start_seconds']:.1f} |")
    for key in ("plain_loop", "ray_copies_1", "ray_copies_4"):
        print(f"2 CPUs / 1 CPU, {key}: {rows[1][key] / rows[0][key]:.2f}x")
    print(f"bytes per stored image (JPEG q95): {rows[0]['bytes_per_image_copies_4']:.0f}")
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
