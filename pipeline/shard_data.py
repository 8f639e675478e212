"""Reading the Parquet shards on the driver: Ray datasets for training and validation, and the
AFLW2000-3D evaluation shards as batches of faces to score."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.data import FileShuffleConfig

from models.frame import CROP_SIZE
from pipeline.train_config import DataConfig
from preprocessing.benchmark_sets import FaceBatch
from preprocessing.datasets import resolve
from preprocessing.manifest import SPLITS, Manifest
from preprocessing.shards import decode_image

TRAINING_COLUMNS = ["image", "label", "landmarks"]
EVALUATION_COLUMNS = ["id", "image", "roi_box", "pt3d_68", "yaw"]


def decode_batch(batch: dict[str, np.ndarray], image_format: str) -> dict[str, np.ndarray]:
    """Shard rows -> uint8 images (B, 120, 120, 3) and float32 labels (B, 62) / landmarks (B, 204);
    any other column passes through."""
    images = np.stack([decode_image(data, image_format, CROP_SIZE) for data in batch["image"]])
    return {
        **batch,
        "image": images,
        "label": np.asarray(np.stack(batch["label"]), dtype=np.float32),
        "landmarks": np.asarray(np.stack(batch["landmarks"]), dtype=np.float32),
    }


def read_split(shards: str, manifest: Manifest, split: str, columns: list[str],
               file_seed: int | None = None) -> ray.data.Dataset:
    """The ``columns`` of a split's shards; with ``file_seed``, the files in a new seeded order
    each time the dataset runs (every epoch), otherwise in the manifest's order."""
    filesystem, root = resolve(shards)
    paths = [f"{root}/{name}" for name in manifest.splits[split]]
    if not paths:
        raise ValueError(f"{shards}: the {split} split is empty")
    shuffle = None if file_seed is None else FileShuffleConfig(seed=file_seed, reseed_after_execution=True)
    # Ray's file-listing Parquet reader (use_datasource_v2) spends seconds listing and
    # sampling the files before the first row, every epoch; the direct reader does not. A read
    # task a file, not files split into smaller blocks, lets the decode fuse with the read.
    context = ray.data.DataContext.get_current()
    listing_reader, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        dataset = ray.data.read_parquet(paths, filesystem=filesystem, shuffle=shuffle,
                                        override_num_blocks=len(paths))
    finally:
        context.use_datasource_v2 = listing_reader
    return dataset.select_columns(columns)


def crops_per_source(manifest: Manifest) -> int:
    """Training rows each source image gave (stored side by side in its shard)."""
    return int(manifest.config["augment"]["copies"])


def split_dataset(shards: str, manifest: Manifest, data: DataConfig, seed: int, split: str,
                  extra_columns: tuple[str, ...] = ()) -> ray.data.Dataset:
    """A split as training reads it: the shard files (the training ones in a new order every
    epoch with ``data.shuffle_files``), decoded to uint8 crops in Ray Data tasks (once, into the
    object store, with ``data.cache_decoded``; otherwise again every epoch)."""
    file_seed = seed if split == "train" and data.shuffle_files else None
    dataset = read_split(shards, manifest, split, [*TRAINING_COLUMNS, *extra_columns], file_seed)
    # One task reads and decodes one shard file (no batch size, so Ray fuses the two).
    dataset = dataset.map_batches(decode_batch, fn_kwargs={"image_format": manifest.image_format},
                                  batch_format="numpy", batch_size=None)
    return dataset.materialize() if data.cache_decoded else dataset


def shard_datasets(shards: str, manifest: Manifest, data: DataConfig, seed: int,
                   ) -> dict[str, ray.data.Dataset]:
    """Ray datasets of the train and val shards (see :func:`split_dataset`)."""
    return {split: split_dataset(shards, manifest, data, seed, split) for split in SPLITS}


def evaluation_batches(shards: str, manifest: Manifest, batch_size: int = 64) -> Iterator[FaceBatch]:
    """The AFLW2000-3D faces ``frnet preprocess --aflw2000`` wrote, in batches."""
    if manifest.aflw2000 is None:
        raise ValueError(f"{shards}: no AFLW2000-3D shards (preprocess with --aflw2000)")
    filesystem, root = resolve(shards)
    for name in manifest.aflw2000.shards:
        table = pq.read_table(f"{root}/{name}", filesystem=filesystem, columns=EVALUATION_COLUMNS)
        for start in range(0, table.num_rows, batch_size):
            rows = table.slice(start, batch_size).to_pylist()
            crops = [decode_image(row["image"], manifest.image_format, CROP_SIZE) for row in rows]
            yield FaceBatch(
                stems=[row["id"] for row in rows],
                crops=np.stack(crops),
                boxes=np.array([row["roi_box"] for row in rows], dtype=np.float64),
                truth=np.array([row["pt3d_68"] for row in rows], dtype=np.float64).reshape(-1, 3, 68),
                yaw_deg=np.rad2deg(np.array([row["yaw"] for row in rows], dtype=np.float64)),
            )


def evaluation_count(manifest: Manifest) -> int:
    """How many AFLW2000-3D faces the evaluation shards hold."""
    return 0 if manifest.aflw2000 is None else int(manifest.aflw2000.counts["written"])
