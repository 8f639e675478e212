"""Hostile and broken inputs to `frnet preprocess`: image headers that lie, images that disagree
with their annotation, odd trees (links, misnamed files), --strict's one line, and the decoded
bytes a shard task holds at once."""

import os
import re
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io

from models.face_models import load_face_model
from preprocessing.annotations import MAX_IMAGE_SIDE_PX, check_image_header, decode_image, image_header_size
from preprocessing.augment import AugmentConfig
from preprocessing.dataflow import PreprocessConfig, ShardJob, ShardProcessor
from preprocessing.datasets import EncodedImage, list_300w_lp, scan_300w_lp
from preprocessing.errors import CorruptImageError, DatasetError
from preprocessing.manifest import Manifest, ManifestError, read_manifest
from preprocessing.synth import SynthConfig, generate
from tests.conftest import shared_path

SMALL = PreprocessConfig(augment=AugmentConfig(copies=1), sources_per_shard=8, batch_size=4, val_fraction=0.3)
# 4 unflipped images of 2 faces and their _Flip twins: 8 samples.
SYNTH = SynthConfig("300w-lp", n=4, seed=31, views_per_face=2)


@pytest.fixture(scope="module")
def synth_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "300W_LP"
    generate(SYNTH, root)
    return root


def copy_tree(source, target):
    shutil.copytree(source, target)
    return target


def jpeg(image, quality=95):
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return encoded.tobytes()


def with_frame_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF) claims another size; the scan data stays as it was."""
    at = 2
    while data[at + 1] not in (0xC0, 0xC1, 0xC2):
        at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


# -- 1. image headers that lie -----------------------------------------------------------------


def test_image_sizes_come_from_the_header_without_decoding():
    image = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    assert image_header_size(jpeg(image)) == (50, 30)
    progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert image_header_size(progressive) == (50, 30)
    assert image_header_size(cv2.imencode(".png", image)[1].tobytes()) == (50, 30)
    real = shared_path("300w-lp-sample", "IBUG_image_008_1_0.jpg").read_bytes()
    assert check_image_header(real, "real.jpg") == (450, 450)


def test_a_header_beyond_the_ceiling_is_refused_naming_the_claimed_size():
    data = with_frame_size(jpeg(np.full((64, 64, 3), 90, np.uint8)), 60000, 60000)
    refused = r"^big.jpg: image header claims 60000x60000 px, beyond the ceiling of 8000 px a side"
    with pytest.raises(CorruptImageError, match=refused + r" \(max_image_side\); not decoded$"):
        decode_image(data, "big.jpg")
    png = bytearray(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes())
    png[16:24] = struct.pack(">II", 100000, 3)  # IHDR width, height
    with pytest.raises(CorruptImageError, match="claims 100000x3 px, beyond the ceiling of 8000 px"):
        check_image_header(bytes(png), "big.png")
    assert MAX_IMAGE_SIDE_PX == PreprocessConfig().max_image_side == 8000


def test_every_decoder_error_is_a_corrupt_image_error():
    # With the ceiling lifted, OpenCV's own limit (2^30 pixels) raises cv2.error inside imdecode.
    data = with_frame_size(jpeg(np.full((64, 64, 3), 90, np.uint8)), 60000, 60000)
    opencv = r"^big.jpg: not a decodable image \(OpenCV: .*CV_IO_MAX_IMAGE_PIXELS"
    with pytest.raises(CorruptImageError, match=opencv):
        decode_image(data, "big.jpg", max_side=70000)
    with pytest.raises(CorruptImageError, match="not a decodable image .a JPEG without a frame header"):
        decode_image(b"\xff\xd8" + os.urandom(500) + b"\xff\xd9", "garbage.jpg")


def test_a_uniform_image_is_refused_after_decoding():
    encoded = EncodedImage("grey.jpg", jpeg(np.full((450, 450, 3), 128, np.uint8)), 450, 450)
    uniform = r"^grey.jpg: uniform image \(every pixel is BGR \(128, 128, 128\)\): no face to crop$"
    with pytest.raises(CorruptImageError, match=uniform):
        encoded.decode()


# -- 2. image and annotation that disagree ------------------------------------------------------


def test_a_real_image_resized_beside_its_annotation_is_quarantined_naming_both_sizes(tmp_path):
    jpg = shared_path("300w-lp-sample", "IBUG_image_008_1_0.jpg")
    mat = shared_path("300w-lp-sample", "IBUG_image_008_1_0.mat")
    (tmp_path / "IBUG").mkdir()
    shutil.copy(jpg, tmp_path / "IBUG" / jpg.name)  # as released: written
    shutil.copy(mat, tmp_path / "IBUG" / mat.name)
    half = cv2.resize(cv2.imread(str(jpg)), (225, 225), interpolation=cv2.INTER_AREA)
    (tmp_path / "IBUG" / "IBUG_image_008_1_1.jpg").write_bytes(jpeg(half))
    shutil.copy(mat, tmp_path / "IBUG" / "IBUG_image_008_1_1.mat")
    _, refs = list_300w_lp(tmp_path)
    job = ShardJob(0, refs, str(tmp_path), str(tmp_path / "out"), "train")
    summary = ShardProcessor(SMALL, False, load_face_model(SMALL.morphable_model))(job)
    assert summary["written"] == 1 and summary["quarantined"] == 1
    (row,) = pq.read_table(tmp_path / "out" / "quarantine" / "part-00000.parquet").to_pylist()
    assert row["file"] == "IBUG/IBUG_image_008_1_1.jpg" and row["stage"] == "label"
    assert re.match(r"image is 225x225 px but its annotation's landmarks need \d+x\d+ px", row["reason"]), row


# -- 3, 1, 2 end to end: a planted tree through Ray Data, counts reconciled in the manifest --------


def plant_hostile_files(root):
    """Returns ({file: (stage, reason start)} to be quarantined, {file: reason start} to be skipped)."""
    afw, helen = sorted((root / "AFW").glob("*.jpg")), sorted((root / "HELEN").glob("*.jpg"))
    flip = sorted((root / "AFW_Flip").glob("*.jpg"))
    afw[0].write_bytes(with_frame_size(afw[0].read_bytes(), 60000, 60000))
    afw[1].write_bytes(b"\xff\xd8" + os.urandom(2000) + b"\xff\xd9")
    flip[0].write_bytes(jpeg(np.full((450, 450, 3), 128, np.uint8)))
    image = cv2.imread(str(helen[0]))
    helen[0].write_bytes(jpeg(cv2.resize(image, (225, 225), interpolation=cv2.INTER_AREA)))
    (root / "AFW" / "notes.jpg").write_bytes(jpeg(image))  # no 300W-LP name
    for folder in ("IBUG", "LFPW"):
        (root / folder).mkdir()
    (root / "IBUG" / "IBUG_9_1_0.jpg").symlink_to(root / "nowhere.jpg")
    (root / "IBUG" / "loop.mat").symlink_to(root / "IBUG" / "loop.mat")
    (root / "LFPW" / "Thumbs.db").write_bytes(b"\x00" * 10)
    name = lambda path: str(path.relative_to(root))  # noqa: E731
    quarantined = {
        name(afw[0]): ("decode", "image header claims 60000x60000 px, beyond the ceiling of 8000 px a side"),
        name(afw[1]): ("decode", "not a decodable image (a JPEG without a frame header)"),
        name(flip[0]): ("decode", "uniform image (every pixel is BGR (128, 128, 128))"),
        name(helen[0]): ("label", "image is 225x225 px but its annotation's landmarks need"),
        "AFW/notes.jpg": ("list", "not a 300W-LP file name (expected <face>_<view index>.jpg / .mat"),
    }
    skipped = {"IBUG/IBUG_9_1_0.jpg": f"dangling symbolic link (to {root}/nowhere.jpg, which does not exist)",
               "IBUG/loop.mat": "symbolic link loop", "LFPW/Thumbs.db": "not a .jpg or .mat file"}
    return quarantined, skipped


def test_hostile_files_are_quarantined_or_skipped_and_counts_reconcile(synth_tree, ray_local, tmp_path):
    from preprocessing.ray_preprocess import run_preprocess

    root = copy_tree(synth_tree, tmp_path / "300W_LP")
    quarantined, skipped = plant_hostile_files(root)
    manifest = run_preprocess(str(root), str(tmp_path / "out"), SMALL)
    counts = manifest.counts
    assert counts["inputs"] == 8 + 1 + 3 == counts["written"] + counts["quarantined"] + counts["skipped"]
    assert (counts["written"], counts["quarantined"], counts["skipped"]) == (4, 5, 3)
    found = {row["file"]: (row["stage"], row["reason"]) for row in manifest.quarantine}
    assert set(found) == set(quarantined)
    for file, (stage, reason) in quarantined.items():
        assert found[file][0] == stage and found[file][1].startswith(reason), (file, found[file])
    assert {row["file"]: row["reason"] for row in manifest.skipped} == skipped
    # The quarantine table holds the listing's rows too; the manifest on disk reads back reconciled.
    tables = sorted((tmp_path / "out" / "quarantine").glob("*.parquet"))
    assert {row["file"] for row in pq.read_table(tables).to_pylist()} == set(quarantined)
    assert read_manifest(str(tmp_path / "out")).skipped == manifest.skipped
    rows = pq.read_table(sorted((tmp_path / "out").glob("[tv][ra]*/*.parquet"))).to_pylist()
    assert len(rows) == 4 and not {r["source_file"].rsplit(".", 1)[0] for r in rows} & \
        {f.rsplit(".", 1)[0] for f in quarantined}


def test_strict_stops_at_a_misnamed_file_before_touching_the_output(synth_tree, tmp_path):
    from preprocessing.ray_preprocess import run_preprocess

    root = copy_tree(synth_tree, tmp_path / "300W_LP")
    (root / "HELEN" / "IMG 1.mat").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"HELEN/IMG 1.mat: not a 300W-LP file name") as caught:
        run_preprocess(str(root), str(tmp_path / "out"), SMALL, strict=True)
    assert caught.value.stage == "list" and not (tmp_path / "out").exists()
    scan = scan_300w_lp(root)  # without --strict: listed for the quarantine, not a sample
    assert len(scan.refs) == 8 and [err.path for err in scan.misnamed] == [str(root / "HELEN" / "IMG 1.mat")]


def test_the_manifest_reader_refuses_counts_that_do_not_reconcile(tmp_path):
    from tests.preprocessing.test_manifest import small_manifest

    data = small_manifest().to_dict()
    assert data["skipped"] == [] and Manifest.from_dict(data, "m.json").skipped == []
    del data["skipped"]  # a manifest written before skipped entries existed: none skipped
    assert Manifest.from_dict(data, "m.json").to_dict()["skipped"] == []
    data["counts"] = {**data["counts"], "inputs": 4}
    with pytest.raises(ManifestError, match=r"^m.json: counts do not reconcile: inputs 4 != written 2 \+ "
                                            r"quarantined 1 \+ skipped 0$"):
        Manifest.from_dict(data, "m.json")
    data["counts"] = {**data["counts"], "skipped": 1}
    with pytest.raises(ManifestError, match="0 skipped entries for counts of 1 quarantined and 1 skipped"):
        Manifest.from_dict(data, "m.json")
    data["skipped"] = [{"file": "AFW/x.jpg", "reason": "symbolic link loop"}]
    assert Manifest.from_dict(data, "m.json").skipped == data["skipped"]


# -- 4. --strict says one line ------------------------------------------------------------------

# Ray's notice at start-up, printed by ray.init before the stage runs: not part of the report.
RAY_STARTUP_NOTICE = "Token authentication is enabled for this Ray cluster"


@pytest.mark.ray
def test_strict_prints_one_line_naming_the_file_and_the_reason(synth_tree, tmp_path):
    root = copy_tree(synth_tree, tmp_path / "300W_LP")
    victim = sorted((root / "HELEN").glob("*.jpg"))[0]
    victim.write_bytes(with_frame_size(victim.read_bytes(), 60000, 60000))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "preprocess", "--input", str(root), "--output",
         str(tmp_path / "out"), "--strict", "--num-cpus", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines()
             if not re.match(r"^\d\d:\d\d:\d\d INFO ", line) and RAY_STARTUP_NOTICE not in line]
    assert lines == [f"{lines[0][:8]} ERROR frnet.preprocess: {victim}: image header claims 60000x60000 px, "
                     "beyond the ceiling of 8000 px a side (max_image_side); not decoded"], result.stderr


def test_a_bad_file_raised_inside_ray_is_found_in_the_exception_chain(ray_local):
    from pipeline.preprocess import bad_file_line

    def fail(batch):
        raise CorruptImageError("/data/AFW/x.jpg", "not a decodable image")

    # Ray Data: RayTaskError(UserCodeException), the task's error left as traceback text only.
    with pytest.raises(ray_local.exceptions.RayError) as caught:
        ray_local.data.from_items([{"a": 1}]).map_batches(fail).take_all()
    assert bad_file_line(caught.value) == "/data/AFW/x.jpg: not a decodable image"
    # A plain Ray task: RayTaskError whose cause is the error itself (DatasetError pickles).
    with pytest.raises(ray_local.exceptions.RayTaskError) as caught:
        ray_local.get(ray_local.remote(fail).remote(None))
    assert bad_file_line(caught.value) == "/data/AFW/x.jpg: not a decodable image"
    assert isinstance(caught.value.cause, CorruptImageError) and caught.value.cause.stage == "decode"
    assert bad_file_line(ValueError("other")) is None


# -- 5. bounded memory per task -----------------------------------------------------------------


def enlarge(refs, side):
    """Each sample's image pasted into the top-left of a side x side black canvas, its .mat's ty
    moved so that the face keeps its pixels (the .mat's rows count from the bottom edge)."""
    for ref in refs:
        jpg = Path(ref.image_path)
        image = cv2.imread(str(jpg))
        canvas = np.zeros((side, side, 3), np.uint8)
        canvas[:image.shape[0], :image.shape[1]] = image
        jpg.write_bytes(jpeg(canvas))
        mat = jpg.with_suffix(".mat")
        fields = {k: v for k, v in scipy.io.loadmat(mat).items() if not k.startswith("__")}
        fields["Pose_Para"][0, 4] += side - image.shape[0]
        scipy.io.savemat(mat, fields)


def test_a_shard_task_holds_one_decoded_image_whatever_the_batch(synth_tree, tmp_path):
    root = copy_tree(synth_tree, tmp_path / "300W_LP")
    side = 2400
    _, refs = list_300w_lp(root)
    big = [ref for ref in refs if not ref.flipped]
    enlarge(big, side)
    assert len(big) == 4
    config = PreprocessConfig(augment=AugmentConfig(copies=1), batch_size=len(big))
    processor = ShardProcessor(config, False, load_face_model(config.morphable_model))
    job = ShardJob(0, big, str(root), str(tmp_path / "out"), "train")
    tracemalloc.start()
    try:
        summary = processor(job)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary["written"] == 4 and summary["quarantined"] == 0, summary
    one_image = side * side * 3
    # A batch decoded at once held 4 images (> 69 MB); one at a time holds one plus small change.
    assert peak < 2 * one_image, f"peak {peak / 1e6:.1f} MB for {one_image / 1e6:.1f} MB images"


def test_the_ceiling_is_a_config_key_validated_once():
    with pytest.raises(ValueError, match="max_image_side must be >= 1, got 0"):
        PreprocessConfig(max_image_side=0)
    assert PreprocessConfig(max_image_side=500).digest() != PreprocessConfig().digest()
