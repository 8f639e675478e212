"""A short GPU training run that checks what a CPU machine cannot: the GPU path trains, is fast,
and its model file works on a CPU.

    python benchmarks/gpu_check.py --images 2000 --epochs 3 --json gpu_check.json

On a machine with CUDA: synthetic 300W-LP shards, then ``frnet train``'s own code with one Ray
Train worker on the GPU (``use_gpu``, bf16 autocast, channels_last), while ``nvidia-smi`` is
sampled for utilisation and memory. Prints samples/s per epoch, the GPU's mean and peak
utilisation and its peak memory, and checks (exit 1 otherwise):

- the training loss falls from the first epoch to the last;
- the model file loads on the CPU and its predictions on validation crops match the GPU's bf16
  predictions within bf16 tolerance (2D landmark difference under 1% of the crop's side at the
  95th percentile).

With ``--cpus-per-gpu-from ceiling.json`` (``benchmarks/input_ceiling.py``'s output) it also
prints how many CPUs feed the measured GPU rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CROP_SIDE = 120


def sample_gpu(stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    """(utilisation %, memory MiB) of GPU 0 from nvidia-smi, twice a second."""
    while not stop.is_set():
        try:
            text = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "--id=0"], capture_output=True, text=True, timeout=5, check=True).stdout
            util, memory = (float(value) for value in text.strip().split(","))
            samples.append((util, memory))
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        stop.wait(0.5)


def cpu_matches_gpu(model_file: Path, shards: str) -> float:
    """95th percentile of the 2D landmark difference (pixels of the 120-px crop) between the
    model file run on the CPU in float32 and on the GPU under bf16 autocast."""
    import numpy as np
    import torch

    from models.checkpoint import load_bundle
    from models.frame import param_frame_to_crop_torch
    from pipeline.data.shard_reader import split_dataset
    from pipeline.training.config import DataConfig
    from preprocessing.manifest import read_manifest

    bundle, _ = load_bundle(model_file)
    manifest = read_manifest(shards)
    crops = next(split_dataset(shards, manifest, DataConfig(shards=shards), 0, "val")
                 .iter_batches(batch_size=64, batch_format="numpy"))["image"]
    cpu = bundle.predictor("cpu")
    gpu = bundle.predictor("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        on_gpu = gpu.predict_params(crops)
    on_cpu = cpu.predict_params(crops)
    landmarks = [param_frame_to_crop_torch(cpu.model.landmarks(torch.from_numpy(p)))[:, :2].numpy()
                 for p in (on_cpu, on_gpu)]
    return float(np.percentile(np.linalg.norm(landmarks[0] - landmarks[1], axis=1), 95))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="unflipped synthetic images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cpus-per-gpu-from", type=Path, help="input_ceiling.py's --json output")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    import logging

    import mlflow
    import ray

    from pipeline.runtime.ray_session import start_ray
    from pipeline.runtime.stage_tools import write_json
    from pipeline.training.config import DataConfig, RunConfig, ScalingConfig, TrainConfig
    from pipeline.training.run import train
    from preprocessing.dataflow import PreprocessConfig
    from preprocessing.ray_preprocess import run_preprocess
    from preprocessing.synth import SynthConfig, generate

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(SynthConfig("300w-lp", n=args.images, seed=0), root / "300W_LP", workers=os.cpu_count() or 1)
        start_ray(log_to_driver=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        run_preprocess(str(root / "300W_LP"), str(root / "shards"), PreprocessConfig())
        cpus = int(ray.cluster_resources().get("CPU", 1))
        config = TrainConfig(
            epochs=args.epochs, bf16=True, channels_last=True,
            data=DataConfig(shards=str(root / "shards"), batch_size=args.batch_size, cache_decoded=True),
            scaling=ScalingConfig(num_workers=1, use_gpu=True, cpus_per_worker=1.0),
            run=RunConfig(name="gpu-check", max_failures=0))
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_gpu, args=(stop, samples), daemon=True)
        sampler.start()
        started = time.perf_counter()
        figures = train(config, root / "run").to_json()
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        client = mlflow.MlflowClient(figures["tracking_uri"])
        history = {name: [m.value for m in sorted(client.get_metric_history(figures["run_id"], name),
                                                  key=lambda m: m.step)]
                   for name in ("train_loss", "samples_per_second", "val_nme")}
        difference = cpu_matches_gpu(Path(figures["model_file"]), str(root / "shards"))
        ray.shutdown()
    busy = [util for util, _ in samples]
    result = {
        "gpu": torch.cuda.get_device_name(0), "cpus": cpus, "batch_size": args.batch_size,
        "samples_per_second": history["samples_per_second"], "train_loss": history["train_loss"],
        "val_nme": history["val_nme"], "seconds": seconds,
        "gpu_util_mean": sum(busy) / len(busy) if busy else None, "gpu_util_peak": max(busy, default=None),
        "gpu_memory_peak_mib": max((memory for _, memory in samples), default=None),
        "cpu_gpu_landmark_p95_px": difference,
    }
    print(json.dumps(result, indent=2))
    if args.cpus_per_gpu_from:
        ceiling = json.loads(args.cpus_per_gpu_from.read_text())
        per_cpu = min(row["ray"] / row["cpus"] for row in ceiling["table"])
        rate = max(history["samples_per_second"][1:] or history["samples_per_second"])
        result["cpus_per_gpu"] = rate / per_cpu
        print(f"feeding {rate:.0f} samples/s at {per_cpu:.0f} samples/s per CPU takes "
              f"{result['cpus_per_gpu']:.1f} CPUs for Ray Data")
    write_json(args.json, result)
    failures = []
    if not history["train_loss"][-1] < history["train_loss"][0]:
        failures.append(f"the training loss did not fall: {history['train_loss']}")
    if not difference < 0.01 * CROP_SIDE:
        failures.append(f"CPU and GPU landmarks differ by {difference:.3f} px (95th percentile)")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
