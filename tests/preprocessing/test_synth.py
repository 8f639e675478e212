"""Synthetic datasets: the real readers read them unchanged and their labels are exact."""

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

from models.synthetic_face import build_synthetic_head
from preprocessing.datasets import list_300w_lp, list_aflw2000, read_annotation, read_landmarks
from preprocessing.labels import canonical_angles
from preprocessing.synth import SynthConfig, generate
from preprocessing.verify import label_round_trip
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def head():
    return build_synthetic_head()


@pytest.fixture(scope="module")
def synth_300w_lp(tmp_path_factory):
    out = tmp_path_factory.mktemp("300W_LP")
    generate(SynthConfig("300w-lp", n=8, seed=3, views_per_face=4), out)
    return out


@pytest.fixture(scope="module")
def synth_aflw2000(tmp_path_factory):
    out = tmp_path_factory.mktemp("AFLW2000")
    generate(SynthConfig("aflw2000-3d", n=6, seed=4), out)
    return out


def mat_layout(path) -> dict[str, tuple]:
    """Field name -> (dtype, shape) of a .mat file, the header entries left out."""
    return {k: (v.dtype.str, v.shape) for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}


def folder_digest(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "synth.json"):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_300w_lp_layout_is_the_real_one(synth_300w_lp):
    filesystem, refs = list_300w_lp(synth_300w_lp)
    assert len(refs) == 16  # 8 views + their _Flip twins
    assert sum(r.flipped for r in refs) == 8
    assert len({r.subject_id for r in refs}) == 2  # 2 source faces x 4 views
    assert {r.subset for r in refs} == {"AFW", "HELEN"}
    real = mat_layout(shared_path("300w-lp-sample", "IBUG_image_008_1_0.mat"))
    synthetic = mat_layout(refs[0].mat_path)
    assert synthetic == real
    points = read_landmarks(filesystem, refs[0])
    np.testing.assert_allclose(points["pts_2d"], read_annotation(filesystem, refs[0]).pt2d)


def test_aflw2000_layout_is_the_real_one(synth_aflw2000):
    filesystem, refs = list_aflw2000(synth_aflw2000)
    assert [r.stem for r in refs] == [f"image{i:05d}" for i in range(6)]
    real = mat_layout(shared_path("aflw2000-3d", "mat", "image00427.mat"))
    assert mat_layout(refs[0].mat_path) == real


@pytest.mark.parametrize("layout", ["300w-lp", "aflw2000-3d"])
def test_synth_read_label_landmark_round_trip_is_exact(head, layout, synth_300w_lp, synth_aflw2000):
    root = synth_300w_lp if layout == "300w-lp" else synth_aflw2000
    report = label_round_trip(head.model, layout, str(root))
    assert report.failed == {} and report.checked == report.inputs > 0
    assert report.max_error_px <= 1e-4
    if layout == "aflw2000-3d":
        assert report.max_pt3d_error_px <= 1e-4


def test_flip_twin_has_the_mirrored_pose(synth_300w_lp):
    filesystem, refs = list_300w_lp(synth_300w_lp)
    by_key = {(r.stem, r.flipped): r for r in refs}
    for (stem, flipped), ref in by_key.items():
        if flipped:
            continue
        a = read_annotation(filesystem, ref).pose_para
        b = read_annotation(filesystem, by_key[(stem, True)]).pose_para
        np.testing.assert_allclose(canonical_angles(b), canonical_angles(a) * [1, -1, -1], atol=1e-6)
        assert b[3] == pytest.approx(451 - a[3], abs=1e-4)


def test_poses_cover_profiles(tmp_path):
    generate(SynthConfig("aflw2000-3d", n=40, seed=9), tmp_path)
    filesystem, refs = list_aflw2000(tmp_path)
    yaws = np.abs([np.rad2deg(canonical_angles(read_annotation(filesystem, r).pose_para)[1])
                   for r in refs])
    assert yaws.max() <= 90.0 and (yaws > 60).sum() >= 2 and (yaws <= 30).sum() >= 15


def test_deterministic_for_a_seed(tmp_path, synth_aflw2000):
    again = tmp_path / "again"
    generate(SynthConfig("aflw2000-3d", n=6, seed=4), again, workers=2)
    assert folder_digest(again) == folder_digest(synth_aflw2000)
    other = tmp_path / "other"
    generate(SynthConfig("aflw2000-3d", n=6, seed=5), other)
    assert folder_digest(other) != folder_digest(synth_aflw2000)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="layout must be one of"):
        SynthConfig("300w", n=3)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        SynthConfig("aflw2000-3d", n=0)


# Small renders, summarised by what a reader sees: each image's mean colour in a 4x4 grid and the
# sums and sums of squares of the labels the project reads. The bytes themselves follow the
# numpy and OpenCV builds installed (the same code gives other JPEG bytes with other builds), so
# the summaries are compared with tolerances far below any change of the synthetic datasets.
# Record them again, after a deliberate change of the renderer, with
#   python -m tests.preprocessing.test_synth
REFERENCE = Path(__file__).with_name("synth_reference.json")
RENDERS = {"300w-lp-8-5": ("300w-lp", 8, 5), "aflw2000-3d-6-7": ("aflw2000-3d", 6, 7)}
LABEL_FIELDS = ("Pose_Para", "Shape_Para", "Exp_Para", "pt2d", "pt3d_68")


def render_summary(root: Path) -> dict[str, list[float]]:
    summary = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".jpg", ".mat")):
        name = str(path.relative_to(root))
        if path.suffix == ".jpg":
            grid = cv2.resize(cv2.imread(str(path)).astype(np.float64), (4, 4), interpolation=cv2.INTER_AREA)
            summary[name] = grid.reshape(-1).round(3).tolist()
        else:
            fields = scipy.io.loadmat(path)
            arrays = [np.asarray(fields[key], np.float64) for key in LABEL_FIELDS if key in fields]
            summary[name] = [float(v) for array in arrays for v in (array.sum(), (array * array).sum())]
    return summary


@pytest.mark.parametrize("render", sorted(RENDERS))
def test_rendered_folder_matches_the_recorded_render(tmp_path, render):
    layout, n, seed = RENDERS[render]
    generate(SynthConfig(layout, n=n, seed=seed), tmp_path, workers=1)
    summary, recorded = render_summary(tmp_path), json.loads(REFERENCE.read_text())[render]
    assert sorted(summary) == sorted(recorded)
    for name, values in summary.items():
        if name.endswith(".jpg"):  # mean colours of 16 cells, 0-255
            np.testing.assert_allclose(values, recorded[name], atol=0.5, err_msg=name)
        else:
            np.testing.assert_allclose(values, recorded[name], rtol=1e-9, atol=1e-9, err_msg=name)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        renders = {}
        for render, (layout, n, seed) in sorted(RENDERS.items()):
            generate(SynthConfig(layout, n=n, seed=seed), Path(scratch) / render, workers=1)
            renders[render] = render_summary(Path(scratch) / render)
    REFERENCE.write_text(json.dumps(renders, indent=0) + "\n")
