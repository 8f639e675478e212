"""Memory at 300W-LP's full size: preprocessing and a step budget of training, at 12,245 and at
122,450 inputs, peak RSS of the driver and of every Ray process, and the object store's peak.

    python benchmarks/scale_run.py --sizes 12245 122450 --steps 150 --json scale.json

For each size a tree laid out like 300W-LP (``preprocessing.linked_tree``: hard links to a few
rendered files, 300W-LP's subset proportions, 16 views a face, ``_Flip`` twins) is preprocessed
with the default config (four crops a source) and then trained for ``--steps`` batches per worker
(``data.max_batches``; two workers, batch 32, validation capped the same way), streaming from the
whole shard set with every level of shuffling on. Each stage runs in a child process that starts
its own local Ray; this process samples the child (the driver) and every process under it (GCS,
raylet, Ray workers) twice a second, and the child samples its object store's bytes in use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

SAMPLE_SECONDS = 0.5


def role(process: psutil.Process) -> str:
    """A process's part: its Ray title (``ray::RayTrainWorker``), else its program name."""
    try:
        words = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    first = words[0] if words else process.name()
    if first.startswith("ray::"):
        return first.split(" ")[0].split("(")[0].rstrip(":")
    name = Path(first).name
    if name.startswith("python") and len(words) > 1:
        script = next((w for w in words[1:] if w.endswith(".py")), "")
        return Path(script).stem or name
    return name


def watch(pid: int, stop: threading.Event, peaks: dict) -> None:
    """Peak RSS of ``pid`` (the driver) and of each process under it, by role."""
    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                rss = process.memory_info().rss
                part = "driver" if process.pid == pid else role(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            key = (part, process.pid)
            peaks[key] = max(peaks.get(key, 0), rss)
        stop.wait(SAMPLE_SECONDS)


def run_stage(args: list[str]) -> dict:
    """Run one stage in a child process, sampling its memory; returns its figures."""
    peaks: dict = {}
    stop = threading.Event()
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        child = subprocess.Popen([sys.executable, __file__, "--child", out.name, *args])
        sampler = threading.Thread(target=watch, args=(child.pid, stop, peaks), daemon=True)
        sampler.start()
        if child.wait() != 0:
            raise SystemExit(f"stage {args} failed (exit {child.returncode})")
        stop.set()
        sampler.join()
        figures = json.loads(Path(out.name).read_text())
    by_role: dict[str, list[int]] = {}
    for (part, _), rss in peaks.items():
        by_role.setdefault(part, []).append(rss)
    figures["seconds"] = time.perf_counter() - started
    figures["peak_rss_mib"] = {part: round(max(values) / 2**20, 1) for part, values in by_role.items()}
    figures["processes"] = {part: len(values) for part, values in by_role.items()}
    return figures


def child(out: Path, stage: str, root: Path, steps: int) -> None:
    """One stage in this process (the driver), with the object store sampled beside it."""
    import logging

    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    from pipeline.runtime.ray_session import start_ray

    logging.basicConfig(level=logging.WARNING)
    start_ray(os.cpu_count(), log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    store = {"peak": 0}
    stop = threading.Event()
    address = ray.get_runtime_context().gcs_address

    def sample_store() -> None:
        state = get_state_from_address(address)
        while not stop.is_set():
            try:
                used = get_memory_info_reply(state, timeout_seconds=5).store_stats.object_store_bytes_used
                store["peak"] = max(store["peak"], used)
            except Exception:  # noqa: BLE001 - a missed sample while Ray is busy is not an error
                pass
            stop.wait(1.0)

    sampler = threading.Thread(target=sample_store, daemon=True)
    sampler.start()
    figures: dict = {}
    if stage == "preprocess":
        from preprocessing.dataflow import PreprocessConfig
        from preprocessing.ray_preprocess import run_preprocess

        manifest = run_preprocess(str(root / "300W_LP"), str(root / "shards"), PreprocessConfig())
        figures = {"inputs": manifest.counts["inputs"], "rows": manifest.counts["rows"],
                   "shards": sum(len(names) for names in manifest.splits.values()),
                   "manifest_bytes": (root / "shards" / "manifest.json").stat().st_size}
    else:
        from pipeline.training.config import DataConfig, RunConfig, ScalingConfig, TrainConfig
        from pipeline.training.run import train

        config = TrainConfig(epochs=1, data=DataConfig(shards=str(root / "shards"), batch_size=32,
                                                      eval_batch_size=32, max_batches=steps),
                             scaling=ScalingConfig(num_workers=2),
                             run=RunConfig(name="scale", max_failures=0))
        result = train(config, root / "run")
        best = result.best
        figures = {"val_nme": best["val_nme"], "samples_per_second": best["samples_per_second"]}
    stop.set()
    sampler.join()
    figures["object_store_peak_mib"] = round(store["peak"] / 2**20, 1)
    ray.shutdown()
    out.write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12245, 122450], help="inputs (images)")
    parser.add_argument("--steps", type=int, default=150, help="training batches per worker")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=4, metavar=("OUT", "STAGE", "ROOT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out, stage, root, steps = args.child
        child(Path(out), stage, Path(root), int(steps))
        return
    from pipeline.runtime.stage_tools import write_json
    from preprocessing.linked_tree import link_300w_lp
    from preprocessing.synth import SynthConfig, generate

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool"
        generate(SynthConfig("300w-lp", n=64, seed=0, views_per_face=4), pool)
        for size in args.sizes:
            root = Path(tmp) / f"size-{size}"
            link_300w_lp(pool, root / "300W_LP", size // 2)
            row = {"inputs": size}
            for stage in ("preprocess", "train"):
                row[stage] = run_stage([stage, str(root), str(args.steps)])
                print(f"{size} inputs, {stage}: {json.dumps(row[stage])}", flush=True)
            results.append(row)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB; {args.steps} training batches per worker")
    for stage in ("preprocess", "train"):
        roles = sorted({part for row in results for part in row[stage]["peak_rss_mib"]})
        print(f"\n{stage}: peak RSS (MiB) by process; object store peak; wall time")
        print("| inputs | " + " | ".join(roles) + " | object store | seconds |")
        print("|---" * (len(roles) + 3) + "|")
        for row in results:
            figures = row[stage]
            cells = [str(figures["peak_rss_mib"].get(part, "-")) for part in roles]
            print(f"| {row['inputs']} | " + " | ".join(cells) +
                  f" | {figures['object_store_peak_mib']} | {figures['seconds']:.0f} |")
    for row in results:
        print(f"{row['inputs']} inputs: manifest {row['preprocess']['manifest_bytes']} bytes, "
              f"{row['preprocess']['shards']} shard files, rows {row['preprocess']['rows']}")
    write_json(args.json, {"steps": args.steps, "results": results})


if __name__ == "__main__":
    main()
