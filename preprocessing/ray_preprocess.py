"""The preprocessing run on a Ray cluster (local or remote): shard tasks, statistics, manifest.

See :mod:`preprocessing.dataflow` for the dataflow; this module schedules it with Ray Data,
resumes finished shards, merges the label moments the shard tasks computed into the whitening
statistics, and writes ``manifest.json`` whose counts reconcile:
inputs = written + quarantined + skipped. The listing's own finds are the driver's: a file whose
name is not the dataset's is quarantined (``quarantine/listing.parquet``, stage ``list``) and an
entry that is no sample's file (a dangling or looping link, a folder, another file) is skipped.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from models.face_models import load_face_model
from models.mirror import mirror_map
from models.morphable import MorphableModel
from preprocessing.dataflow import (
    PreprocessConfig,
    ShardJob,
    combine_stats,
    dealt_sources,
    finished_record,
    process_shards,
    relative_path,
    shard_jobs,
    stopped_at,
)
from preprocessing.datasets import Scan, resolve, scan_300w_lp, scan_aflw2000
from preprocessing.manifest import (
    MANIFEST_FILE,
    SPLITS,
    EvaluationShards,
    LabelModel,
    Manifest,
    find_manifest,
    write_manifest,
)
from preprocessing.shards import QUARANTINE_SCHEMA, AtomicParquetWriter

LOG = logging.getLogger(__name__)
OUTPUT_FOLDERS = ("train", "val", "quarantine", "aflw2000", "aflw2000-quarantine", "_shards")
LISTING_QUARANTINE = "listing.parquet"  # in each quarantine folder, beside the shards' part files


class OutputExistsError(RuntimeError):
    """The output folder holds shards of another config or input set."""


def code_version() -> str:
    """The package version, plus the git commit when run from a checkout."""
    version = metadata.version("mobile-frnet")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}"


def _prepare_output(filesystem: pafs.FileSystem, output: str, config: PreprocessConfig, input_root: str,
                    overwrite: bool) -> None:
    previous = None if overwrite else find_manifest(filesystem, output)
    if previous is not None:
        same = previous.config_digest == config.digest() and previous.input == input_root
        if not same:
            raise OutputExistsError(
                f"{output} holds shards of another config or input ({previous.config_digest}, "
                f"{previous.input}); pass --overwrite to replace them or choose another --output")
    if overwrite:
        for folder in (*OUTPUT_FOLDERS, MANIFEST_FILE):
            info = filesystem.get_file_info(f"{output}/{folder}")
            if info.type == pafs.FileType.Directory:
                filesystem.delete_dir(info.path)
            elif info.type == pafs.FileType.File:
                filesystem.delete_file(info.path)
    filesystem.create_dir(output, recursive=True)


def _run_jobs(jobs: list[ShardJob], config: PreprocessConfig, strict: bool, filesystem: pafs.FileSystem,
              workers: int, model: MorphableModel) -> list[dict]:
    digest = config.digest()
    records, pending = [], []
    for job in jobs:
        record = finished_record(filesystem, job, digest)
        (records if record else pending).append(record or job)
    if records:
        LOG.info("%d of %d shards already complete; skipping them", len(records), len(jobs))
    if not pending:
        return records
    size = max(1, min(workers, len(pending)))
    dataset = ray.data.from_items([{"key": job.key} for job in pending], override_num_blocks=len(pending))
    model_ref = ray.put(model)  # held here until every shard is done
    dataset = dataset.map_batches(
        process_shards, batch_size=1, compute=ray.data.TaskPoolStrategy(size=size),
        num_cpus=config.num_cpus_per_task,
        fn_kwargs={"jobs": {job.key: job for job in pending}, "config": config, "strict": strict,
                   "model": [model_ref]},
    )
    started = time.perf_counter()
    for done, row in enumerate(dataset.iter_rows(), start=1):
        record = json.loads(row["summary"])
        stop = stopped_at(record)
        if stop is not None:  # --strict
            raise stop
        records.append(record)
        elapsed = time.perf_counter() - started
        LOG.info("shard %s-%05d done (%d/%d, %.1f s): %d written, %d quarantined", record["kind"],
                 record["shard"], done, len(pending), elapsed, record["written"], record["quarantined"])
    return records


def _listing_rows(scan: Scan, root: str, strict: bool) -> list[dict]:
    """The quarantine rows of the files a scan found misnamed; ``strict``: the first is raised."""
    if strict and scan.misnamed:
        raise scan.misnamed[0]
    return [{"file": relative_path(err.path, root), "stage": err.stage, "reason": err.reason}
            for err in scan.misnamed]


def _skipped_rows(scan: Scan, root: str) -> list[dict]:
    return [{"file": relative_path(entry.path, root), "reason": entry.reason} for entry in scan.skipped]


def _write_listing_quarantine(filesystem: pafs.FileSystem, output: str, folder: str,
                              rows: list[dict]) -> None:
    path = f"{output}/{folder}/{LISTING_QUARANTINE}"
    if rows:
        writer = AtomicParquetWriter(filesystem, path, QUARANTINE_SCHEMA)
        writer.write_rows(rows)
        writer.close()
    elif filesystem.get_file_info(path).type == pafs.FileType.File:
        filesystem.delete_file(path)


def _quarantine_rows(
    filesystem: pafs.FileSystem, output: str, folder: str, records: list[dict]
) -> list[dict]:
    rows = []
    for record in sorted(records, key=lambda r: r["shard"]):
        if record["quarantined"]:
            path = f"{output}/{folder}/part-{record['shard']:05d}.parquet"
            rows += pq.read_table(path, filesystem=filesystem).to_pylist()
    return rows


def _counts(records: list[dict], listed: list[dict], skipped: list[dict]) -> dict[str, Any]:
    """The shard records' counts plus the listing's quarantined and skipped entries."""
    counts: dict[str, Any] = {"inputs": len(listed) + len(skipped), "written": 0, "quarantined": len(listed),
                              "skipped": len(skipped), "rows": {}, "by_subset": {}}
    for record in records:
        for key in ("inputs", "written", "quarantined"):
            counts[key] += record[key]
        for key, value in record["rows"].items():
            counts["rows"][key] = counts["rows"].get(key, 0) + value
        for key, value in record["by_subset"].items():
            counts["by_subset"][key] = counts["by_subset"].get(key, 0) + value
    return counts


def run_preprocess(
    input_root: str, output: str, config: PreprocessConfig, aflw2000_root: str | None = None,
    strict: bool = False, overwrite: bool = False, workers: int | None = None,
) -> Manifest:
    """Preprocess a 300W-LP tree (and an AFLW2000-3D folder) into shards; returns the manifest."""
    filesystem, out_path = resolve(output)
    _, in_path = resolve(input_root)
    model = load_face_model(config.morphable_model)  # once, here: the shard tasks get its arrays
    scan = scan_300w_lp(input_root)  # before the output is touched: --strict may stop here
    refs, listed, skipped = scan.refs, _listing_rows(scan, in_path, strict), _skipped_rows(scan, in_path)
    eval_refs: list = []
    eval_listed: list[dict] = []
    eval_skipped: list[dict] = []
    if aflw2000_root:
        _, eval_root = resolve(aflw2000_root)
        eval_scan = scan_aflw2000(aflw2000_root)
        eval_refs, eval_skipped = eval_scan.refs, _skipped_rows(eval_scan, eval_root)
        eval_listed = _listing_rows(eval_scan, eval_root, strict)
    _prepare_output(filesystem, out_path, config, in_path, overwrite)
    jobs = shard_jobs(dealt_sources(refs, config), input_root, output, config.sources_per_shard, "train")
    if aflw2000_root:
        jobs += shard_jobs(eval_refs, aflw2000_root, output, config.sources_per_shard, "aflw2000")
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // config.num_cpus_per_task))
    LOG.info("%d source files (+%d AFLW2000-3D) in %d shards, %d workers", len(refs), len(eval_refs),
             len(jobs), workers)
    if listed or skipped:
        LOG.info("listing: %d misnamed files quarantined, %d entries skipped (see manifest.json)",
                 len(listed), len(skipped))
    records = _run_jobs(jobs, config, strict, filesystem, workers, model)
    train_records = [r for r in records if r["kind"] == "train"]
    eval_records = [r for r in records if r["kind"] == "aflw2000"]
    counts = _counts(train_records, listed, skipped)
    # Each shard file's rows, so training can name the one file that does not match.
    counts["rows_by_file"] = {f"{split}/part-{r['shard']:05d}.parquet": r["rows"].get(split, 0)
                              for r in train_records for split in SPLITS}
    _write_listing_quarantine(filesystem, out_path, "quarantine", listed)
    stats = combine_stats([r["moments"] for r in train_records])
    mirror_residual = mirror_map(model).residual if config.augment.geometric.flip_probability > 0 else None
    evaluation = None
    if aflw2000_root:
        _write_listing_quarantine(filesystem, out_path, "aflw2000-quarantine", eval_listed)
        evaluation = EvaluationShards(
            input=resolve(aflw2000_root)[1], counts=_counts(eval_records, eval_listed, eval_skipped),
            quarantine=eval_listed + _quarantine_rows(filesystem, out_path, "aflw2000-quarantine",
                                                      eval_records),
            shards=tuple(sorted(f"aflw2000/part-{r['shard']:05d}.parquet" for r in eval_records)),
            skipped=eval_skipped)
    manifest = Manifest(
        input=in_path, output=out_path, counts=counts,
        quarantine=listed + _quarantine_rows(filesystem, out_path, "quarantine", train_records),
        skipped=skipped,
        splits={split: tuple(sorted(f"{split}/part-{r['shard']:05d}.parquet" for r in train_records))
                for split in SPLITS},
        whitening=stats,
        morphable_model=LabelModel(config.morphable_model, model.identity, mirror_residual),
        image_format=config.image_format, config=asdict(config), config_digest=config.digest(),
        code_version=code_version(), aflw2000=evaluation,
    )
    manifest.check_counts(out_path)  # an internal invariant: a ManifestError here is a bug
    write_manifest(filesystem, out_path, manifest)
    return manifest


def mean_bytes_per_image(filesystem: pafs.FileSystem, output: str, split: str = "train") -> float:
    """Average stored size of one image in a split's shards (encoded bytes)."""
    sizes = []
    selector = pafs.FileSelector(f"{output}/{split}", recursive=False)
    for info in filesystem.get_file_info(selector):
        if info.path.endswith(".parquet"):
            column = pq.read_table(info.path, filesystem=filesystem, columns=["image"]).column("image")
            sizes += [len(v) for v in column.to_pylist()]
    return float(np.mean(sizes)) if sizes else float("nan")
