"""Preprocessing throughput: the plain decode + crop loop against the full Ray Data run.

    python benchmarks/preprocess_speed.py --n 300 [--repeats 3] --json preprocess_speed.json

On one synthetic 300W-LP folder, in one process tree, for 1 and 2 CPUs:
(a) read + JPEG decode + landmark-rule crop + resize to 120x120 in a plain loop (N processes),
    the practical limit of any preprocessing, with as many crops per image as (b) writes;
(b) ``frnet preprocess`` with Ray Data (label, augment, encode, Parquet, statistics), once with
    one crop per image (the same work as (a) plus labels and shards) and once with the default
    four augmented crops.
For (b) three rates: the whole run (``run_preprocess`` from call to manifest, including starting
the Ray actors, a few seconds once per run); the working rate: source images over the span
from the first shard task's start to the last one's end (each shard records both); and the
steady rate, each worker's images over its own busy window, summed (see :func:`steady_rate`),
which is what a dataset of many shards sees. Prints images/s (source images), the ratios (b)/(a) and
2-CPU / 1-CPU, and bytes per image. With ``--repeats R`` the whole grid runs R times, one round
after another, and the table gives the medians with every round's ratio beside them: on a shared
2-core machine one run's (b) varies by about 10%.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from pipeline.runtime.stage_tools import write_json  # noqa: E402


def _plain_worker(paths: list[tuple[str, str]], copies: int = 1) -> int:
    import cv2

    from models.frame import crop_image, landmark_crop_box
    from preprocessing.annotations import decode_image, parse_mat

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
from pipeline.runtime.ray_session import start_ray
from preprocessing.augment import AugmentConfig
from preprocessing.dataflow import PreprocessConfig
from preprocessing.ray_preprocess import run_preprocess
source, output, cpus, copies = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
start_ray(cpus, dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
ray.data.DataContext.get_current().enable_progress_bars = False
config = PreprocessConfig(augment=AugmentConfig(copies=copies))
started = time.perf_counter()
manifest = run_preprocess(source, output, config)
print(json.dumps({"seconds": time.perf_counter() - started, "inputs": manifest.counts["inputs"]}))
"""


def ray_run(source: Path, output: Path, cpus: int, copies: int) -> tuple[int, float]:
    """(source images, seconds) of one preprocessing run in a fresh Ray."""
    command = [sys.executable, "-c", RAY_RUN, str(source), str(output), str(cpus), str(copies)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return figures["inputs"], figures["seconds"]


def measure(source: Path, pairs: list[tuple[str, str]], work: Path, cpus: int, copies: int) -> dict:
    """One side-by-side measurement: (a) then (b) on the same images, same CPU count and crops."""
    from preprocessing.datasets import resolve
    from preprocessing.ray_preprocess import mean_bytes_per_image

    plain = plain_loop(pairs, cpus, copies)
    output = work / f"shards-{cpus}-{copies}"
    shutil.rmtree(output, ignore_errors=True)
    n_all, t_all = ray_run(source, output, cpus, copies)
    records = [json.loads(p.read_text()) for p in (output / "_shards").glob("*.json")]
    span = max(r["finished_at"] for r in records) - min(r["started_at"] for r in records)
    steady = steady_rate(records)
    return {"cpus": cpus, "copies": copies, "images": len(pairs), "plain_loop": plain,
            "ray_working": n_all / span, "ray_whole_run": n_all / t_all, "outside_span_s": t_all - span,
            "ray_steady": steady, "ratio": n_all / span / plain, "steady_ratio": steady / plain,
            "bytes_per_image": mean_bytes_per_image(*resolve(str(output)))}


def steady_rate(records: list[dict]) -> float:
    """Source images/s of the pool while its workers are busy: each worker's images over its own
    window (its first shard's start to its last shard's end, the waits between its shards
    included), summed over the workers. Unlike the span, it leaves out the one-off stagger of
    the workers' first shards and the last shard's tail, which a dataset of many shards spreads
    thin (300W-LP's 122,450 images are 479 shards of 256)."""
    by_worker: dict[str, list[dict]] = {}
    for record in records:
        by_worker.setdefault(record["worker"], []).append(record)
    rates = []
    for own in by_worker.values():
        window = max(r["finished_at"] for r in own) - min(r["started_at"] for r in own)
        rates.append(sum(r["inputs"] for r in own) / window)
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="unflipped synthetic images (x2 with flips)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the whole grid (interleaved); the table gives medians")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from preprocessing.datasets import list_300w_lp
    from preprocessing.synth import SynthConfig, generate

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "300W_LP"
        generate(SynthConfig("300w-lp", n=args.n, seed=0), source, workers=os.cpu_count() or 1)
        _, refs = list_300w_lp(source)
        pairs = [(r.image_path, r.mat_path) for r in refs]
        for _ in range(args.repeats):
            runs += [measure(source, pairs, Path(tmp), cpus, copies) for cpus in (1, 2) for copies in (1, 4)]
    grid: dict[tuple[int, int], list[dict]] = {}
    for run in runs:
        grid.setdefault((run["cpus"], run["copies"]), []).append(run)

    def median(cpus: int, copies: int, key: str) -> float:
        return statistics.median(r[key] for r in grid[cpus, copies])

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {len(pairs)} source images; "
          f"{args.repeats} round(s), medians")
    print("| CPUs | crops | (a) plain loop | (b) working | (b)/(a) | (b)/(a) each round | (b) steady | "
          "steady/(a) | steady/(a) each round | (b) whole run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (cpus, copies), rounds in grid.items():
        each = " ".join(f"{r['ratio']:.3f}" for r in rounds)
        each_steady = " ".join(f"{r['steady_ratio']:.3f}" for r in rounds)
        print(f"| {cpus} | {copies} | {median(cpus, copies, 'plain_loop'):.0f} | "
              f"{median(cpus, copies, 'ray_working'):.0f} | {median(cpus, copies, 'ratio'):.3f} | {each} | "
              f"{median(cpus, copies, 'ray_steady'):.0f} | {median(cpus, copies, 'steady_ratio'):.3f} | "
              f"{each_steady} | {median(cpus, copies, 'ray_whole_run'):.0f} |")
    for copies in (1, 4):
        for key, name in (("plain_loop", "(a) plain loop"), ("ray_working", "(b) Ray Data")):
            each = [two[key] / one[key] for one, two in zip(grid[1, copies], grid[2, copies], strict=True)]
            print(f"2 CPUs / 1 CPU, {copies} crop(s), {name}: {statistics.median(each):.2f}x "
                  f"(each round: {' '.join(f'{x:.2f}' for x in each)})")
    print(f"bytes per stored image (JPEG q95): {median(1, 4, 'bytes_per_image'):.0f}")
    write_json(args.json, {"runs": runs})


if __name__ == "__main__":
    main()
