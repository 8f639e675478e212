"""Ray Data preprocessing end to end on synthetic folders: shards, splits, counts, bad files,
statistics, and a run killed half way then resumed."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io

from pipeline.runtime.config import load_config
from preprocessing.augment import AugmentConfig
from preprocessing.dataflow import PreprocessConfig
from preprocessing.ray_preprocess import OutputExistsError, run_preprocess
from preprocessing.shards import decode_image
from preprocessing.synth import SynthConfig, generate
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.ray
SMALL = PreprocessConfig(augment=AugmentConfig(copies=2), sources_per_shard=6, batch_size=3, val_fraction=0.3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(SynthConfig("300w-lp", n=12, seed=21, views_per_face=3), root / "300W_LP")
    generate(SynthConfig("aflw2000-3d", n=6, seed=22), root / "AFLW2000")
    return root


@pytest.fixture(scope="module")
def clean_run(folders, ray_local, tmp_path_factory):
    output = tmp_path_factory.mktemp("shards")
    manifest = run_preprocess(str(folders / "300W_LP"), str(output), SMALL,
                              aflw2000_root=str(folders / "AFLW2000"))
    return output, manifest


def read_split(output, split):
    return pq.read_table(sorted((output / split).glob("*.parquet"))).to_pylist()


def test_counts_reconcile_and_rows_are_complete(clean_run):
    output, manifest = clean_run
    counts = manifest.counts
    assert counts["inputs"] == 24 and counts["written"] == 24 and counts["quarantined"] == 0
    train, val = read_split(output, "train"), read_split(output, "val")
    assert len(train) + len(val) == 24 * 2 == sum(counts["rows"].values())
    assert len({r["id"] for r in train + val}) == len(train) + len(val)
    assert manifest.aflw2000.counts["written"] == 6
    assert manifest.morphable_model.identity.startswith("synthetic-head@")
    assert manifest.config_digest == SMALL.digest() and manifest.code_version


def test_split_by_subject_keeps_views_flips_and_crops_together(clean_run):
    output, _ = clean_run
    train = {r["subject_id"] for r in read_split(output, "train")}
    val = {r["subject_id"] for r in read_split(output, "val")}
    assert train and val and not train & val
    flips = {r["source_file"] for r in read_split(output, "val") if "_Flip/" in r["source_file"]}
    assert flips  # the _Flip twins of a validation face are validation too


def test_shards_read_with_plain_pyarrow_and_labels_match_landmarks(clean_run, synthetic_head):
    from preprocessing.labels import crop_landmarks

    output, manifest = clean_run
    table = pq.read_table(output / "train" / "part-00000.parquet")
    assert table.schema.metadata[b"image_format"] == b"jpeg"
    row = table.slice(0, 1).to_pylist()[0]
    image = decode_image(row["image"], "jpeg")
    assert image.shape == (120, 120, 3)
    label = np.asarray(row["label"], dtype=np.float64)
    np.testing.assert_allclose(np.asarray(row["landmarks"]).reshape(3, 68),
                               crop_landmarks(synthetic_head.model, label), rtol=1e-4, atol=1e-2)


def test_whitening_statistics_equal_numpy_over_the_training_labels(clean_run):
    output, manifest = clean_run
    labels = np.array([r["label"] for r in read_split(output, "train")], dtype=np.float64)
    np.testing.assert_allclose(manifest.whitening.mean, labels.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(manifest.whitening.std, np.maximum(labels.std(0), 1e-8), rtol=1e-7)


def test_aflw2000_shards_keep_the_ground_truth(clean_run, folders):
    output, _ = clean_run
    rows = pq.read_table(output / "aflw2000" / "part-00000.parquet").to_pylist()
    assert [r["id"] for r in rows] == [f"image0000{i}" for i in range(6)]
    truth = scipy.io.loadmat(folders / "AFLW2000" / "image00003.mat")["pt3d_68"]
    np.testing.assert_allclose(np.asarray(rows[3]["pt3d_68"]).reshape(3, 68), truth, atol=1e-4)
    assert {r["yaw_bin"] for r in rows} <= {0, 1, 2} and all(r["augmentation_index"] == 0 for r in rows)


def plant_bad_files(root):
    """One of each kind of bad file; returns {file: (stage, reason)} as they must be quarantined."""
    jpg = sorted((root / "AFW").glob("*.jpg"))
    mats = sorted((root / "HELEN").glob("*.mat")) + sorted((root / "HELEN_Flip").glob("*.mat"))
    ibug = sorted((root / "IBUG").glob("*.mat"))[0]
    jpg[0].write_bytes(b"GIF89a not really an image" * 20)  # corrupt
    data = jpg[1].read_bytes()
    jpg[1].write_bytes(data[: len(data) // 2])  # truncated
    data = mats[0].read_bytes()
    mats[0].write_bytes(data[: len(data) // 3])  # truncated .mat
    mats[1].unlink()  # missing .mat

    def rewrite(path, change):
        fields = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
        change(fields)
        scipy.io.savemat(path, fields)

    rewrite(mats[2], lambda f: f.pop("Exp_Para"))  # missing key
    rewrite(mats[3], lambda f: f["Shape_Para"].__setitem__((5, 0), np.nan))  # NaN
    rewrite(ibug, lambda f: f["Pose_Para"].__setitem__((0, 6), 1e-12))  # a face shrunk to a point
    name = lambda path: str(path.relative_to(root))  # noqa: E731
    return {
        name(jpg[0]): ("decode", "not a decodable image"),
        name(jpg[1]): ("decode", "truncated JPEG"),
        name(mats[0]): ("read", "not a readable MAT file"),
        name(mats[1]): ("read", "file does not exist"),
        name(mats[2]): ("read", "field 'Exp_Para' is missing"),
        name(mats[3]): ("read", "field 'Shape_Para' holds NaN or inf"),
        name(ibug): ("label", "degenerate landmarks"),
    }


def test_bad_files_are_quarantined_and_counts_reconcile(folders, ray_local, tmp_path):
    root = tmp_path / "300W_LP"
    shutil.copytree(folders / "300W_LP", root)
    planted = plant_bad_files(root)
    manifest = run_preprocess(str(root), str(tmp_path / "out"), SMALL)
    counts = manifest.counts
    assert counts["quarantined"] == len(planted) == 7
    assert counts["inputs"] == 24 == counts["written"] + counts["quarantined"]
    found = {q["file"]: (q["stage"], q["reason"]) for q in manifest.quarantine}
    assert set(found) == set(planted)
    for file, (stage, reason) in planted.items():
        assert found[file][0] == stage and reason in found[file][1], (file, found[file])
    rows = read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "val")
    assert len(rows) == counts["written"] * 2
    bad_sources = {file.rsplit(".", 1)[0] for file in planted}
    assert not {r["source_file"].rsplit(".", 1)[0] for r in rows} & bad_sources


def frnet(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_strict_stops_at_the_first_bad_file(folders, tmp_path):
    root = tmp_path / "300W_LP"
    shutil.copytree(folders / "300W_LP", root)
    victim = sorted((root / "LFPW").glob("*.mat"))[0]
    victim.write_bytes(b"garbage")
    result = frnet("preprocess", "--input", str(root), "--output", str(tmp_path / "out"), "--strict",
                   "--num-cpus", "1", cwd=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line or "Traceback" in line]
    assert len(errors) == 1 and f"{victim}: not a readable MAT file" in errors[0], result.stderr
    assert not (tmp_path / "out" / "_shards").exists()  # the stopped shard left no completion record


def test_a_killed_run_resumes_without_duplicates(folders, tmp_path):
    config = tmp_path / "slow.yaml"
    config.write_text("sources_per_shard: 2\nbatch_size: 1\nnum_cpus_per_task: 2.0\naugment:\n  copies: 2\n")
    output = tmp_path / "out"
    args = ["--input", str(folders / "300W_LP"), "--output", str(output), "--config", str(config),
            "--num-cpus", "2"]
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "preprocess", *args], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((output / "_shards").glob("*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # A shard task already running in a Ray worker may still finish on its own.
    time.sleep(3)
    done_before = len(list((output / "_shards").glob("*.json")))
    assert 2 <= done_before < 12, "the run was not interrupted half way"
    assert not (output / "manifest.json").exists()
    result = frnet("preprocess", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    skipped = re.search(r"(\d+) of 12 shards already complete", result.stderr)
    assert skipped and done_before <= int(skipped.group(1)) < 12
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["counts"]["inputs"] == manifest["counts"]["written"] == 24
    rows = read_split(output, "train") + read_split(output, "val")
    assert len(rows) == 48 and len({r["id"] for r in rows}) == 48
    assert not list(output.rglob("*.part"))


def test_output_of_another_config_is_not_mixed_in(clean_run, folders, ray_local):
    output, _ = clean_run
    other = PreprocessConfig(augment=AugmentConfig(copies=1), sources_per_shard=6)
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        run_preprocess(str(folders / "300W_LP"), str(output), other)


def test_shipped_config_loads():
    config = load_config(REPO_ROOT / "configs" / "preprocess.yaml", PreprocessConfig)
    assert config.augment.copies == 4 and config.image_format == "jpeg"
