"""Dataset readers: real files read, each kind of bad file raises a typed error naming it."""

import shutil

import cv2
import numpy as np
import pytest
import scipy.io

from preprocessing.annotations import decode_image, parse_mat
from preprocessing.datasets import list_300w_lp, list_aflw2000, read_annotation, read_image
from preprocessing.errors import (
    CorruptAnnotationError,
    CorruptImageError,
    InvalidValueError,
    MissingFieldError,
    MissingFileError,
)
from tests.conftest import shared_path


def valid_fields() -> dict[str, np.ndarray]:
    return {
        "Pose_Para": np.array([[0.1, -0.3, 0.05, 220.0, 230.0, -90.0, 1.3e-3]], np.float32),
        "Shape_Para": np.zeros((199, 1)),
        "Exp_Para": np.zeros((29, 1)),
        "pt2d": np.full((2, 68), 200.0),
    }


def mat_bytes(tmp_path, fields) -> bytes:
    path = tmp_path / "x.mat"
    scipy.io.savemat(path, fields)
    return path.read_bytes()


def test_real_300w_lp_sample_parses():
    path = shared_path("300w-lp-sample", "IBUG_image_008_1_0.mat")
    annotation = parse_mat(path.read_bytes(), str(path))
    assert annotation.pose_para.shape == (7,) and annotation.shape_para.shape == (199,)
    assert annotation.exp_para.shape == (29,) and annotation.pt2d.shape == (2, 68)
    assert annotation.pt3d_68 is None
    image = decode_image(shared_path("300w-lp-sample", "IBUG_image_008_1_0.jpg").read_bytes(), "x")
    assert image.shape == (450, 450, 3) and image.dtype == np.uint8


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda f: f.pop("Exp_Para"), MissingFieldError, "field 'Exp_Para' is missing"),
        (lambda f: f["Shape_Para"].__setitem__((3, 0), np.nan), InvalidValueError,
         "field 'Shape_Para' holds NaN or inf"),
        (lambda f: f["Pose_Para"].__setitem__((0, 4), np.inf), InvalidValueError,
         "field 'Pose_Para' holds NaN or inf"),
        (lambda f: f.__setitem__("Exp_Para", np.zeros((5, 1))), InvalidValueError,
         "field 'Exp_Para' has 5 values, expected >= 10"),
        (lambda f: f["Pose_Para"].__setitem__((0, 6), 0.0), InvalidValueError,
         "field .Pose_Para. has scale 0"),
        (lambda f: f.__setitem__("pt2d", np.zeros((68, 2))), InvalidValueError,
         r"field 'pt2d' has shape \(68, 2\), expected \(2, K\)"),
    ],
)
def test_bad_fields_name_file_and_reason(tmp_path, mutate, error, message):
    fields = valid_fields()
    mutate(fields)
    with pytest.raises(error, match=f"^sample.mat: {message}"):
        parse_mat(mat_bytes(tmp_path, fields), "sample.mat")


def test_truncated_and_garbage_mat_files(tmp_path):
    data = mat_bytes(tmp_path, valid_fields())
    with pytest.raises(CorruptAnnotationError, match="^cut.mat: not a readable MAT file"):
        parse_mat(data[: len(data) // 2], "cut.mat")
    with pytest.raises(CorruptAnnotationError, match="^junk.mat: not a readable MAT file"):
        parse_mat(b"this is not a mat file at all" * 10, "junk.mat")
    with pytest.raises(CorruptAnnotationError, match="^empty.mat: empty file"):
        parse_mat(b"", "empty.mat")
    with pytest.raises(MissingFieldError, match="field 'pt3d_68' is missing"):
        parse_mat(data, "aflw.mat", require_pt3d=True)


def test_corrupt_and_truncated_jpegs():
    ok, encoded = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))
    data = encoded.tobytes()
    assert decode_image(data, "ok.jpg").shape == (64, 64, 3)
    with pytest.raises(CorruptImageError, match="^cut.jpg: truncated JPEG"):
        decode_image(data[: len(data) - 40], "cut.jpg")
    with pytest.raises(CorruptImageError, match="^junk.jpg: not a decodable image"):
        decode_image(b"\x00\x01garbage" * 50, "junk.jpg")


def make_300w_lp_tree(root):
    """A two-folder 300W-LP tree from the one real pair, plus a jpg whose .mat is missing."""
    jpg = shared_path("300w-lp-sample", "IBUG_image_008_1_0.jpg")
    mat = shared_path("300w-lp-sample", "IBUG_image_008_1_0.mat")
    for folder in ("IBUG", "IBUG_Flip"):
        (root / folder).mkdir(parents=True)
        shutil.copy(jpg, root / folder / jpg.name)
        shutil.copy(mat, root / folder / mat.name)
    shutil.copy(jpg, root / "IBUG" / "IBUG_image_009_1_3.jpg")
    (root / "Code").mkdir()  # other folders of the real download are ignored


@pytest.mark.parametrize("as_uri", [False, True])
def test_300w_lp_listing_and_reading(tmp_path, as_uri):
    make_300w_lp_tree(tmp_path)
    root = tmp_path.as_uri() if as_uri else tmp_path
    filesystem, refs = list_300w_lp(root)
    assert [(r.subset, r.flipped, r.stem) for r in refs] == [
        ("IBUG", False, "IBUG_image_008_1_0"), ("IBUG", False, "IBUG_image_009_1_3"),
        ("IBUG", True, "IBUG_image_008_1_0"),
    ]
    assert [r.subject_id for r in refs] == ["IBUG_image_008_1", "IBUG_image_009_1", "IBUG_image_008_1"]
    assert read_image(filesystem, refs[0]).shape == (450, 450, 3)
    assert read_annotation(filesystem, refs[2]).pt2d.shape == (2, 68)
    with pytest.raises(MissingFileError, match="IBUG_image_009_1_3.mat: file does not exist"):
        read_annotation(filesystem, refs[1])


def test_listing_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        list_300w_lp(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a 300W-LP tree"):
        list_300w_lp(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an AFLW2000-3D folder"):
        list_aflw2000(tmp_path)


def test_aflw2000_listing_in_protocol_order():
    filesystem, refs = list_aflw2000(shared_path("aflw2000-3d", "mat"))
    assert len(refs) == 2000 and refs[0].stem == "image00002"
    assert [r.stem for r in refs] == sorted(r.stem for r in refs)
    annotation = read_annotation(filesystem, refs[255])
    assert refs[255].stem == "image00427" and annotation.pt3d_68.shape == (3, 68)
    # The protocol array at the same index holds the same landmarks.
    pts68 = np.load(shared_path("aflw2000-3d", "protocol", "AFLW2000-3D.pts68.npy"))
    np.testing.assert_allclose(annotation.pt3d_68[:2], pts68[255][:2], atol=1e-3)
