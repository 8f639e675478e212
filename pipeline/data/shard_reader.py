"""Reading the Parquet shards on the driver: Ray datasets for training and validation, and the
AFLW2000-3D evaluation shards as batches of faces to score; the shards checked against their
manifest before a run starts, and a shard that fails a read while it runs named in one line."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.exceptions
from ray.data import FileShuffleConfig

from models.frame import CROP_SIZE
from pipeline.runtime.console import causes
from pipeline.training.config import DataConfig
from preprocessing.benchmark_sets import FaceBatch
from preprocessing.datasets import resolve
from preprocessing.manifest import MANIFEST_FILE, SPLITS, Manifest
from preprocessing.shards import decode_image

TRAINING_COLUMNS = ["image", "label", "landmarks"]
EVALUATION_COLUMNS = ["id", "image", "roi_box", "pt3d_68", "yaw"]
MISSING = "missing"
NOT_PARQUET = "not a Parquet file (truncated?)"
# Row counts of each shard file (relative path -> rows), where a manifest records them.
ROWS_BY_FILE = "rows_by_file"
# Footers read at once: on an object store each is a request or two of latency.
FOOTER_READERS = 16
# A shard path as Ray Data's and pyarrow's read errors quote it.
QUOTED_PARQUET_PATH = re.compile(r"'([^'\n]+\.parquet)'")
REPREPROCESS = "preprocess again (frnet preprocess ... --overwrite)"
EVALUATION_PART = "aflw2000"  # the AFLW2000-3D shards, beside the train and val splits


class ShardError(ValueError):
    """A shard file that is missing, is not Parquet, or does not hold the rows its manifest says."""


def check_shards(shards: str, manifest: Manifest,
                 parts: tuple[str, ...] = (*SPLITS, EVALUATION_PART)) -> None:
    """Every shard file the manifest lists exists, is Parquet, and the rows in the files (their
    footers only) are the rows the manifest counts: per file where it records them, per split
    (``counts.rows``) and for the AFLW2000-3D shards (``aflw2000.counts.written``); ``parts``:
    which of them. A ShardError names the file or split and both counts."""
    expected = {split: manifest.counts.get("rows", {}).get(split) for split in SPLITS if split in parts}
    files = {split: manifest.splits[split] for split in SPLITS if split in parts}
    if manifest.aflw2000 is not None and EVALUATION_PART in parts:
        expected[EVALUATION_PART] = manifest.aflw2000.counts.get("written")
        files[EVALUATION_PART] = manifest.aflw2000.shards
    names = [name for split_files in files.values() for name in split_files]
    with ThreadPoolExecutor(max_workers=max(1, min(FOOTER_READERS, len(names)))) as pool:
        rows = dict(zip(names, pool.map(lambda name: shard_rows(shards, name), names), strict=True))
    by_file = manifest.counts.get(ROWS_BY_FILE) or {}
    for name in names:
        if name in by_file and int(by_file[name]) != rows[name]:
            raise ShardError(f"{shard_display(shards, name)}: holds {rows[name]} rows, but the manifest's "
                             f"counts.{ROWS_BY_FILE} says {by_file[name]}; {REPREPROCESS}")
    for split, split_files in files.items():
        held = sum(rows[name] for name in split_files)
        key = "aflw2000.counts.written" if split == EVALUATION_PART else f"counts.rows.{split}"
        if expected[split] is None:
            raise ShardError(f"{shard_display(shards, MANIFEST_FILE)}: no {key} to check the {split} "
                             f"shards against; {REPREPROCESS}")
        if int(expected[split]) != held:
            files_held = f"{len(split_files)} file{'' if len(split_files) == 1 else 's'}"
            raise ShardError(f"{shard_display(shards, MANIFEST_FILE)}: {key} is {expected[split]}, but the "
                             f"{split} shards ({files_held}) hold {held} rows; {REPREPROCESS}")


def check_evaluation_shards(shards: str, manifest: Manifest, morphable_identity: str) -> None:
    """Before a model is scored on the AFLW2000-3D shards: they hold the rows the manifest
    counts (:func:`check_shards`), and the manifest's morphable model is the one the model was
    trained with (a manifest edited or copied from another shard set is refused, not scored)."""
    if manifest.aflw2000 is None:
        raise ShardError(f"{shard_display(shards, MANIFEST_FILE)}: no AFLW2000-3D shards (preprocess with "
                         "--aflw2000)")
    check_shards(shards, manifest, (EVALUATION_PART,))
    labelled = manifest.morphable_model.identity
    if labelled != morphable_identity:
        raise ShardError(f"{shard_display(shards, MANIFEST_FILE)}: morphable_model.identity is {labelled}, "
                         f"but the model scored was trained with {morphable_identity}: these shards were "
                         f"not made for it; {REPREPROCESS}")


def shard_rows(shards: str, name: str) -> int:
    """The rows of one shard file, from its Parquet footer; a ShardError when it is missing or
    not Parquet."""
    filesystem, root = resolve(shards)
    path = f"{root}/{name}"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise ShardError(f"{shard_display(shards, name)}: {MISSING}")
    try:
        with filesystem.open_input_file(path) as stream:
            return pq.ParquetFile(stream).metadata.num_rows
    except pa.ArrowInvalid as err:
        raise ShardError(f"{shard_display(shards, name)}: {NOT_PARQUET}") from err
    except OSError as err:
        raise ShardError(f"{shard_display(shards, name)}: unreadable ({err})") from err


def shard_display(shards: str, name: str) -> str:
    """A shard file as the user named its folder (a path or URI)."""
    return f"{shards.rstrip('/')}/{name}"


def shard_read_failure(err: BaseException) -> str | None:
    """``PATH: REASON`` for a shard read that failed inside Ray (Ray Train's worker error, Ray's
    task error, Ray Data's user-code error, pyarrow's or the filesystem's error, in any nesting),
    or None when ``err`` is no failed read of a Parquet file."""
    for inner in causes(err):
        if isinstance(inner, ray.exceptions.RayError) or not isinstance(inner, (pa.ArrowException, OSError)):
            continue
        text = str(inner).strip()
        path = failed_path(inner, text)
        if path is None:
            continue
        if isinstance(inner, FileNotFoundError):
            reason = MISSING
        elif isinstance(inner, pa.ArrowInvalid):
            reason = NOT_PARQUET
        else:
            reason = f"unreadable ({text.splitlines()[0]})"
        return f"{path}: {reason}"
    return None


def failed_path(err: BaseException, text: str) -> str | None:
    """The Parquet file a read error is about: its ``filename``, the whole message (a bare path),
    or the first path the message quotes."""
    filename = getattr(err, "filename", None)
    for candidate in (str(filename) if filename else "", text):
        if candidate.endswith(".parquet") and not any(c.isspace() for c in candidate):
            return candidate
    found = QUOTED_PARQUET_PATH.search(text)
    return found.group(1) if found else None


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
