"""How well mixed the training batches are: distinct source faces and subsets per batch, read
through training's own path (shard files in their epoch order, the local shuffle buffer), against
what a full shuffle of the whole split would give."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipeline.data.shard_reader import crops_per_source, split_dataset
from pipeline.training.config import DataConfig
from preprocessing.manifest import Manifest

MIXING_COLUMNS = ["subject_id", "subset"]


@dataclass(frozen=True)
class Mixing:
    """Means over the full batches of the epochs read."""

    batches: int
    batch_size: int
    shuffle_rows: int
    faces_per_batch: float  # distinct subject ids (a face and all its views and flips)
    subsets_per_batch: float
    ideal_faces: float  # the same under a full shuffle of the split
    ideal_subsets: float
    first_faces: tuple[tuple[str, ...], ...]  # each epoch's first batch, in order

    @property
    def faces_ratio(self) -> float:
        return self.faces_per_batch / self.ideal_faces


def expected_distinct(group_sizes: list[int], batch: int) -> float:
    """Expected number of groups met by ``batch`` rows drawn at random without replacement from
    rows in groups of ``group_sizes``: the sum over groups of 1 - C(N - n, B) / C(N, B)."""
    total = sum(group_sizes)
    if batch > total:
        raise ValueError(f"a batch of {batch} from {total} rows")

    def log_choose(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    all_ways = log_choose(total, batch)
    missed = [math.exp(log_choose(total - n, batch) - all_ways) if total - n >= batch else 0.0
              for n in group_sizes]
    return float(len(group_sizes) - sum(missed))


def measure_mixing(shards: str, manifest: Manifest, data: DataConfig, seed: int, epochs: int = 1,
                   ) -> Mixing:
    """Read the training split for ``epochs`` epochs as one training worker does (the same read,
    decode and blocks; file order per ``data.shuffle_files``, the local buffer per
    ``data.shuffle_buffer``) and count distinct faces and subsets in each full batch."""
    dataset = split_dataset(shards, manifest, data, seed, "train", extra_columns=MIXING_COLUMNS)
    shuffle_rows = data.shuffle_rows(crops_per_source(manifest))
    faces, subsets, first = [], [], []
    face_rows: Counter[str] = Counter()
    subset_rows: Counter[str] = Counter()
    for epoch in range(epochs):
        batches = dataset.iter_batches(batch_size=data.batch_size, batch_format="numpy", drop_last=True,
                                       local_shuffle_buffer_size=shuffle_rows,
                                       local_shuffle_seed=seed * 1000 + epoch)
        for k, batch in enumerate(batches):
            ids, names = batch["subject_id"], batch["subset"]
            if k == 0:
                first.append(tuple(str(value) for value in ids))
            faces.append(len(np.unique(ids)))
            subsets.append(len(np.unique(names)))
            if epoch == 0:
                face_rows.update(ids.tolist())
                subset_rows.update(names.tolist())
    if not faces:
        raise ValueError(f"{shards}: fewer training rows than one batch of {data.batch_size}")
    return Mixing(
        batches=len(faces), batch_size=data.batch_size, shuffle_rows=shuffle_rows,
        faces_per_batch=float(np.mean(faces)), subsets_per_batch=float(np.mean(subsets)),
        ideal_faces=expected_distinct(list(face_rows.values()), data.batch_size),
        ideal_subsets=expected_distinct(list(subset_rows.values()), data.batch_size),
        first_faces=tuple(first),
    )
