"""Well-mixed training batches on a tree laid out like 300W-LP: sources dealt to shards in a
seeded order (still split by subject), shard files in a new order every epoch, and a local buffer
sized from the data, measured as distinct faces per batch against a full shuffle."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import ray

from pipeline.data.batch_mixing import expected_distinct, measure_mixing
from pipeline.data.shard_reader import read_split
from pipeline.training.config import DataConfig
from preprocessing.augment import AugmentConfig
from preprocessing.dataflow import PreprocessConfig, dealt_sources
from preprocessing.datasets import list_300w_lp
from preprocessing.linked_tree import SUBSET_IMAGES_300W_LP, link_300w_lp, subset_counts
from preprocessing.ray_preprocess import run_preprocess
from preprocessing.synth import SynthConfig, generate

# Shards of 32 sources (two faces' views); batches of 32.
PREPROCESS = PreprocessConfig(augment=AugmentConfig(copies=2), sources_per_shard=32, val_fraction=0.1)


def test_expected_distinct_exact_cases():
    assert expected_distinct([1] * 50, 16) == pytest.approx(16.0, abs=1e-9)
    assert expected_distinct([40], 16) == pytest.approx(1.0, abs=1e-12)
    # Two groups of two, a batch of two: both rows from one group in 2 of C(4, 2) = 6 draws.
    assert expected_distinct([2, 2], 2) == pytest.approx(2 * (1 - 1 / 6), abs=1e-12)
    with pytest.raises(ValueError, match="a batch of 5 from 4 rows"):
        expected_distinct([2, 2], 5)


def test_subset_counts_follow_300w_lp():
    assert subset_counts(61225) == SUBSET_IMAGES_300W_LP
    counts = subset_counts(1000)
    assert sum(counts.values()) == 1000
    assert counts["HELEN"] > counts["LFPW"] > counts["AFW"] > counts["IBUG"] > 0


@pytest.fixture(scope="module")
def linked_shards(tmp_path_factory, ray_local):
    """768 images of 48 faces x 16 views (and their flips) linked from 16 rendered files, each
    preprocessed twice: sources in listed order and dealt at random."""
    root = tmp_path_factory.mktemp("mixing")
    generate(SynthConfig("300w-lp", n=8, seed=5, views_per_face=4), root / "pool")
    counts = link_300w_lp(root / "pool", root / "300W_LP", 768)
    shards = {}
    for shuffled in (False, True):
        output = root / f"shards-{shuffled}"
        manifest = run_preprocess(str(root / "300W_LP"), str(output),
                                  replace(PREPROCESS, shuffle_sources=shuffled))
        shards[shuffled] = (str(output), manifest)
    return root, counts, shards


def test_linked_tree_is_300w_lp_shaped(linked_shards):
    root, counts, shards = linked_shards
    _, refs = list_300w_lp(root / "300W_LP")
    assert len(refs) == 2 * 768 == sum(2 * n for n in counts.values())
    views = defaultdict(int)
    for ref in refs:
        views[ref.subject_id] += 1
    assert max(views.values()) == 32  # 16 views and their flips share the subject
    manifest = shards[True][1]
    assert manifest.counts["inputs"] == manifest.counts["written"] == 1536


def test_dealt_sources_keep_the_split_by_subject(linked_shards):
    root, _, shards = linked_shards
    _, refs = list_300w_lp(root / "300W_LP")
    assert dealt_sources(refs, PREPROCESS) == dealt_sources(refs, PREPROCESS)  # seeded
    assert dealt_sources(refs, PREPROCESS) != refs
    assert dealt_sources(refs, replace(PREPROCESS, shuffle_sources=False)) == refs
    for output, manifest in shards.values():
        split_of = {}
        for split, names in manifest.splits.items():
            for name in names:
                subjects = pq.read_table(f"{output}/{name}", columns=["subject_id"]).column(0).to_pylist()
                for subject in subjects:
                    assert split_of.setdefault(subject, split) == split, subject
        assert sum(manifest.counts["rows"].values()) == 2 * 1536


def test_file_order_changes_every_epoch(linked_shards):
    """With the read tasks' outputs kept in order, only the file shuffle can change the order."""
    _, _, shards = linked_shards
    output, manifest = shards[True]
    context = ray.data.DataContext.get_current()
    kept = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        in_order = read_split(output, manifest, "train", ["id"])
        shuffled = read_split(output, manifest, "train", ["id"], file_seed=3)
        again = read_split(output, manifest, "train", ["id"], file_seed=3)
        plain = [[row["id"] for row in in_order.take(64)] for _ in range(2)]
        epochs = [[row["id"] for row in shuffled.take(64)] for _ in range(3)]
        repeated = [[row["id"] for row in again.take(64)] for _ in range(3)]
    finally:
        context.execution_options.preserve_order = kept
    assert plain[0] == plain[1]
    assert len({tuple(epoch) for epoch in epochs}) == 3
    assert epochs == repeated  # seeded: the same sequence of epoch orders


def test_dealt_shards_hold_many_faces(linked_shards):
    """Cut in listed order, a shard of 32 sources holds a face or two; dealt, it holds many."""
    _, _, shards = linked_shards
    faces = {}
    for shuffled, (output, manifest) in shards.items():
        per_file = [len(set(pq.read_table(f"{output}/{name}", columns=["subject_id"]).column(0).to_pylist()))
                    for name in manifest.splits["train"]]
        faces[shuffled] = sum(per_file) / len(per_file)
    assert faces[False] <= 3.0
    assert faces[True] >= 12.0


def test_batches_are_within_a_tenth_of_a_full_shuffle(linked_shards):
    _, _, shards = linked_shards
    mixing = measure_mixing(*shards[True], DataConfig(batch_size=32), seed=0, epochs=2)
    assert mixing.shuffle_rows == 32 * 2 * 8  # sized from the data: batch x crops per source x 8
    assert mixing.ideal_faces > 20.0  # 43 training faces of about 64 rows each
    assert mixing.faces_ratio >= 0.9, mixing
    assert mixing.subsets_per_batch >= 0.9 * mixing.ideal_subsets
    assert mixing.first_faces[0] != mixing.first_faces[1]
