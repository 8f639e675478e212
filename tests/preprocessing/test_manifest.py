"""The manifest: one typed record, written and read in one place, versioned."""

import json

import numpy as np
import pyarrow.fs as pafs
import pytest

from models.params import NUM_PARAMS, ParamStats
from preprocessing.manifest import (
    MANIFEST_VERSION,
    EvaluationShards,
    LabelModel,
    Manifest,
    ManifestError,
    read_manifest,
    write_manifest,
)


def small_manifest() -> Manifest:
    stats = ParamStats(np.linspace(-1.0, 1.0, NUM_PARAMS), np.linspace(0.5, 2.0, NUM_PARAMS))
    return Manifest(
        input="/data/300W_LP", output="/data/shards",
        counts={"inputs": 3, "written": 2, "quarantined": 1, "rows": {"train": 3, "val": 1}, "by_subset": {}},
        quarantine=[{"file": "AFW/x.mat", "stage": "read", "reason": "truncated"}],
        splits={"train": ("train/part-00000.parquet",), "val": ("val/part-00000.parquet",)},
        whitening=stats, morphable_model=LabelModel("synthetic", "synthetic-head@abc", 0.0),
        image_format="jpeg", config={"seed": 0}, config_digest="d1", code_version="0.1.0",
        aflw2000=EvaluationShards("/data/AFLW2000", {"inputs": 1, "written": 1, "quarantined": 0}, [],
                                  ("aflw2000/part-00000.parquet",)),
    )


def test_a_written_manifest_reads_back_equal(tmp_path):
    manifest = small_manifest()
    write_manifest(pafs.LocalFileSystem(), str(tmp_path), manifest)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["version"] == MANIFEST_VERSION and data["splits"]["train"] == ["train/part-00000.parquet"]
    back = read_manifest(str(tmp_path))
    np.testing.assert_array_equal(back.whitening.mean, manifest.whitening.mean)
    np.testing.assert_array_equal(back.whitening.std, manifest.whitening.std)
    assert back.to_dict() == manifest.to_dict()
    assert back.morphable_model.synthetic and back.aflw2000.shards == ("aflw2000/part-00000.parquet",)


def test_an_unknown_version_or_a_missing_field_is_refused_by_name(tmp_path):
    data = small_manifest().to_dict()
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "version": 7}))
    with pytest.raises(ManifestError, match=r"manifest.json: manifest version 7 is not one this code reads"):
        read_manifest(str(tmp_path))
    del data["whitening"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"manifest.json: the manifest lacks the field 'whitening'"):
        read_manifest(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(str(tmp_path / "elsewhere"))


def test_a_manifest_without_a_version_is_version_1(tmp_path):
    data = small_manifest().to_dict()
    del data["version"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(str(tmp_path)).version == 1
