"""How well mixed training batches are at 300W-LP's size and layout, level by level.

    python benchmarks/batch_mixing.py --images 61225 --json mixing.json

A tree laid out like 300W-LP (four subsets in its proportions, 16 views a face listed one after
another, a ``_Flip`` twin of every image; 2 x ``--images`` inputs, hard links to a few rendered
files, see ``preprocessing.linked_tree``) is preprocessed twice with the default config (four
crops a source, 256 sources a shard): once cutting the listed files into shards in order, once
dealing them at random (``shuffle_sources``). Training's own read path (the same read, decode and
blocks, see ``pipeline.data.batch_mixing``) then counts distinct source faces and subsets in every
batch of 128 over one epoch, for each level of shuffling switched on in turn, against the
expected count under a full shuffle of the split.

The crops repeat (a few rendered files), which changes nothing here: only the file names decide
faces and subsets.

    python benchmarks/batch_mixing.py --ab 1200 --ab-epochs 3 --seeds 0 1 2 --json ab.json

``--ab N`` instead trains on genuinely rendered faces (``frnet synth``: N images of faces at 16
views, listed face by face, subset by subset, with their flips; two crops a source, 64 sources a
shard): "before" (files cut and read in order, a buffer of two shards' rows) against the defaults,
the same budget (epochs, batch 32, two workers) for each seed, and reports the validation NME
(the same validation faces for both: the split is by subject) with the measured mixing.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

LEVELS = [  # (name, sources dealt at random, data config overrides)
    ("before: files cut in order, read in order, buffer 2048 rows", False,
     {"shuffle_files": False, "shuffle_buffer": 2048}),
    ("sources dealt at random to the shards", True, {"shuffle_files": False, "shuffle_buffer": 2048}),
    ("+ shard files in a new order every epoch", True, {"shuffle_files": True, "shuffle_buffer": 2048}),
    ("+ buffer sized from the data (the defaults)", True, {}),
]


def ab_run(images: int, epochs: int, seeds: list[int]) -> list[dict]:
    """Validation NME of "before" and the defaults on rendered faces, per seed."""
    from pipeline.data.batch_mixing import measure_mixing
    from pipeline.training.config import DataConfig, ModelConfig, RunConfig, ScalingConfig, TrainConfig
    from pipeline.training.run import train
    from preprocessing.augment import AugmentConfig
    from preprocessing.dataflow import PreprocessConfig
    from preprocessing.ray_preprocess import run_preprocess
    from preprocessing.synth import SynthConfig, generate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(SynthConfig("300w-lp", n=images, seed=0, views_per_face=16), root / "300W_LP",
                 workers=os.cpu_count() or 1)
        before = {"shuffle_files": False, "shuffle_buffer": 2 * 64 * 2}  # two shards' rows
        arms = {"before": (False, before), "after": (True, {})}
        for arm, (dealt, overrides) in arms.items():
            shards = str(root / f"shards-{arm}")
            manifest = run_preprocess(str(root / "300W_LP"), shards, PreprocessConfig(
                augment=AugmentConfig(copies=2), sources_per_shard=64, shuffle_sources=dealt))
            mixing = measure_mixing(shards, manifest, DataConfig(batch_size=32, **overrides), seed=0)
            for seed in seeds:
                config = TrainConfig(
                    epochs=epochs, seed=seed, model=ModelConfig(width=0.5),
                    data=DataConfig(shards=shards, batch_size=32, **overrides),
                    scaling=ScalingConfig(num_workers=2),
                    run=RunConfig(name=f"ab-{arm}-{seed}", max_failures=0))
                figures = train(config, root / "runs").to_json()
                rows.append({"arm": arm, "seed": seed, "val_nme": figures["best"]["val_nme"],
                             "faces_per_batch": mixing.faces_per_batch, "ideal_faces": mixing.ideal_faces,
                             "train_rows": manifest.counts["rows"]["train"]})
                print(f"{arm} seed {seed}: val NME {100 * rows[-1]['val_nme']:.3f}%", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=61225, help="unflipped images (300W-LP: 61225)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ab", type=int, metavar="N", help="train on N rendered images instead (see above)")
    parser.add_argument("--ab-epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.ab:
        import ray

        from pipeline.runtime.ray_session import start_ray
        from pipeline.runtime.stage_tools import write_json

        start_ray(os.cpu_count(), log_to_driver=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = ab_run(args.ab, args.ab_epochs, args.seeds)
        ray.shutdown()
        print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; {2 * args.ab} rendered inputs, "
              f"{rows[0]['train_rows']} training rows, {args.ab_epochs} epochs, width 0.5, "
              "2 workers x batch 32")
        print("| arm | faces per batch (ideal) | val NME per seed (%) | mean |\n|---|---|---|---|")
        for arm in ("before", "after"):
            mine = [row for row in rows if row["arm"] == arm]
            nmes = [100 * row["val_nme"] for row in mine]
            print(f"| {arm} | {mine[0]['faces_per_batch']:.1f} ({mine[0]['ideal_faces']:.1f}) | "
                  f"{' / '.join(f'{v:.3f}' for v in nmes)} | {sum(nmes) / len(nmes):.3f} |")
        write_json(args.json, {"images": args.ab, "epochs": args.ab_epochs, "runs": rows})
        return

    import ray

    from pipeline.data.batch_mixing import measure_mixing
    from pipeline.runtime.ray_session import start_ray
    from pipeline.runtime.stage_tools import write_json
    from pipeline.training.config import DataConfig
    from preprocessing.dataflow import PreprocessConfig
    from preprocessing.linked_tree import link_300w_lp
    from preprocessing.ray_preprocess import run_preprocess
    from preprocessing.synth import SynthConfig, generate

    start_ray(os.cpu_count(), log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(SynthConfig("300w-lp", n=64, seed=0, views_per_face=4), root / "pool")
        counts = link_300w_lp(root / "pool", root / "300W_LP", args.images)
        manifests = {}
        for dealt in (False, True):
            started = time.perf_counter()
            manifests[dealt] = run_preprocess(str(root / "300W_LP"), str(root / f"shards-{dealt}"),
                                              PreprocessConfig(shuffle_sources=dealt))
            print(f"preprocessed (sources dealt: {dealt}) in {time.perf_counter() - started:.0f} s: "
                  f"{manifests[dealt].counts['rows']}", flush=True)
        for name, dealt, overrides in LEVELS:
            data = DataConfig(batch_size=args.batch_size, **overrides)
            started = time.perf_counter()
            mixing = measure_mixing(str(root / f"shards-{dealt}"), manifests[dealt], data, seed=0)
            row = {"level": name, **{k: v for k, v in asdict(mixing).items() if k != "first_faces"},
                   "faces_ratio": mixing.faces_ratio, "seconds": time.perf_counter() - started}
            rows.append(row)
            print(f"{name}: {mixing.faces_per_batch:.1f} faces, {mixing.subsets_per_batch:.2f} subsets per "
                  f"batch ({mixing.faces_ratio:.3f} of ideal)", flush=True)
    ray.shutdown()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; {2 * args.images} inputs "
          f"({counts}), batch {args.batch_size}")
    print("| level | buffer (rows) | distinct faces per batch | ideal | of ideal | subsets per batch "
          "| ideal |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['level']} | {row['shuffle_rows']} | {row['faces_per_batch']:.1f} | "
              f"{row['ideal_faces']:.1f} | **{row['faces_ratio']:.2f}** | {row['subsets_per_batch']:.2f} | "
              f"{row['ideal_subsets']:.2f} |")
    write_json(args.json, {"images": args.images, "counts": counts, "levels": rows})


if __name__ == "__main__":
    main()
