"""What a Ray Train run costs before any training: an empty two-worker TorchTrainer.fit (the
workers only report once) on a local Ray, at Ray Train's default controller poll (2 s) and at
the 0.5 s the test suite sets, side by side.

    python -m benchmarks.train_floor --fits 3 --json runs/train_floor.json

Each poll setting runs in a process of its own with a Ray of its own (the controller reads
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S when it starts, from the environment Ray was started in).
Prints the seconds of each fit and their median per setting; the first fit of a session starts
worker processes from cold, the later ones show the steady cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLL_VARIABLE = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
SETTINGS = (("Ray's default (2 s)", None), ("0.5 s, as under test", "0.5"))


def time_fits(fits: int, workers: int) -> list[float]:
    """Seconds of ``fits`` empty TorchTrainer.fit calls in this process's own local Ray."""
    import time

    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.runtime.ray_session import start_ray

    start_ray(2, log_to_driver=False, logging_level="ERROR")

    def loop(_config: dict) -> None:
        ray.train.report({"done": 1})

    seconds = []
    with tempfile.TemporaryDirectory() as storage:
        for index in range(fits):
            started = time.perf_counter()
            TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(
                num_workers=workers, resources_per_worker={"CPU": 0.4}),
                run_config=ray.train.RunConfig(name=f"floor-{index}", storage_path=storage)).fit()
            seconds.append(time.perf_counter() - started)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fits", type=int, default=3, help="fits per setting (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--one-setting", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fits < 1 or args.workers < 1:
        parser.error("--fits and --workers must be >= 1")
    if args.one_setting:  # the child: one Ray, this environment's poll
        print(json.dumps(time_fits(args.fits, args.workers)))
        return 0
    figures = {"fits": args.fits, "workers": args.workers, "settings": []}
    for label, poll in SETTINGS:
        env = {key: value for key, value in os.environ.items() if key not in (POLL_VARIABLE, "RAY_ADDRESS")}
        env["RAY_ADDRESS"] = "local"
        if poll is not None:
            env[POLL_VARIABLE] = poll
        child = [sys.executable, "-m", "benchmarks.train_floor", "--one-setting", "--fits", str(args.fits),
                 "--workers", str(args.workers)]
        result = subprocess.run(child, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return 1
        seconds = json.loads(result.stdout.strip().splitlines()[-1])
        median = statistics.median(seconds)
        figures["settings"].append({"poll": label, "seconds": seconds, "median_s": median})
        print(f"{label:24s} fits: {', '.join(f'{s:.1f}' for s in seconds)} s; median {median:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
