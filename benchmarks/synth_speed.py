"""Synthetic rendering speed: images/s per core of `frnet synth` (goal: >= 20).

    python benchmarks/synth_speed.py --n 120 --json synth_speed.json

Renders the same AFLW2000-3D-layout folder with 1 worker process and with all cores, in one run,
into a temporary folder, and prints a markdown table (the whole write: sampling, rendering,
JPEG and .mat encoding, files).
"""

from __future__ import annotations

import os

# One thread per process, set before numpy loads, so "1 worker" means one core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform
import tempfile
from pathlib import Path

import cv2  # noqa: E402

from pipeline.runtime.stage_tools import write_json  # noqa: E402
from preprocessing.synth import SynthConfig, generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--layout", default="aflw2000-3d")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in sorted({1, cores}):
            config = SynthConfig(args.layout, args.n, seed=0)
            figures = generate(config, Path(tmp) / f"w{workers}", workers=workers)
            rows.append({"workers": workers, "images": figures["images"],
                         "images_per_second": figures["images_per_second"],
                         "images_per_second_per_worker": figures["images_per_second_per_worker"]})
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores")
    print("| workers | images | images/s | images/s per worker |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['images']} | {row['images_per_second']:.1f} "
              f"| {row['images_per_second_per_worker']:.1f} |")
    write_json(args.json, {"layout": args.layout, "cores": cores, "rows": rows})


if __name__ == "__main__":
    main()
