import numpy as np
import pytest
import torch

from models.morphable import MorphableModel, MorphableModelError
from tests.conftest import shared_path


def random_3ddfa_arrays(num_vertices: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "u": rng.normal(0, 5e4, 3 * num_vertices).astype(np.float32),
        "w_shp": rng.normal(0, 1e-2, (3 * num_vertices, 199)).astype(np.float32),
        "w_exp": rng.normal(0, 1e3, (3 * num_vertices, 29)).astype(np.float32),
        "keypoints": (3 * rng.choice(num_vertices, 68, replace=False)[:, None] + np.arange(3)).ravel(),
        "tri": rng.integers(0, num_vertices, (3, 150)),
    }


def reference_vertices(arrays: dict[str, np.ndarray], params: np.ndarray) -> np.ndarray:
    """The conventions doc's formula, written plainly: interleaved vectors, Fortran reshape."""
    u = arrays["u"].astype(np.float64)
    shape = u + arrays["w_shp"][:, :40].astype(np.float64) @ params[12:52] \
        + arrays["w_exp"][:, :10].astype(np.float64) @ params[52:]
    camera = params[:12].reshape(3, 4)
    return camera[:, :3] @ shape.reshape(3, -1, order="F") + camera[:, 3:]


def random_params(rng: np.random.Generator, batch: int) -> np.ndarray:
    params = rng.normal(size=(batch, 62))
    params[:, 12:52] *= 3e5
    return params


def test_npz_loader_matches_the_plain_formula(tmp_path):
    arrays = random_3ddfa_arrays()
    np.savez(tmp_path / "bfm.npz", **arrays)
    model = MorphableModel.from_3ddfa_arrays(tmp_path / "bfm.npz")
    params = random_params(np.random.default_rng(1), 4)
    batch = model.vertices(params)
    assert batch.shape == (4, 3, 100)
    for b in range(4):
        np.testing.assert_allclose(batch[b], reference_vertices(arrays, params[b]), rtol=1e-10)
    keypoint_ids = arrays["keypoints"][0::3] // 3
    np.testing.assert_allclose(model.landmarks(params), batch[:, :, keypoint_ids], rtol=1e-12)
    assert model.triangles.shape == (150, 3)


def test_torch_and_numpy_agree(tmp_path):
    arrays = random_3ddfa_arrays()
    np.savez(tmp_path / "bfm.npz", **arrays)
    model = MorphableModel.from_3ddfa_arrays(tmp_path / "bfm.npz")
    params = random_params(np.random.default_rng(2), 3)
    expected = model.landmarks(params)
    got = model.landmarks(torch.tensor(params, dtype=torch.float64))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    got32 = model.vertices(torch.tensor(params, dtype=torch.float32, requires_grad=True))
    got32.sum().backward()
    np.testing.assert_allclose(got32.detach().numpy(), model.vertices(params), rtol=2e-3, atol=5)


def test_folder_of_npy_files_and_save_round_trip(tmp_path):
    arrays = random_3ddfa_arrays(seed=3)
    folder = tmp_path / "configs"
    folder.mkdir()
    del arrays["u"]
    arrays["u_shp"] = np.full(300, 1000.0)
    arrays["u_exp"] = np.full(300, 10.0)
    for key, value in arrays.items():
        np.save(folder / f"{key}.npy", value)
    model = MorphableModel.from_3ddfa_arrays(folder)
    np.testing.assert_allclose(model.mean, 1010.0)
    model.save_npz(tmp_path / "again.npz")
    again = MorphableModel.from_3ddfa_arrays(tmp_path / "again.npz", name=model.name)
    assert again.identity == model.identity


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("w_shp", np.zeros((300, 12)), r"array 'w_shp' must have shape \(300, >=40\), got \(300, 12\)"),
        ("w_exp", np.zeros((299, 29)), r"array 'w_exp' must have shape \(300, >=10\), got \(299, 29\)"),
        ("keypoints", np.arange(10), r"array 'keypoints' must hold 68 vertex ids or 204 flat indices"),
        ("u", np.zeros(301), r"array 'u' must hold 3N values, got 301"),
    ],
)
def test_wrong_shapes_name_file_array_and_expected_shape(tmp_path, key, value, message):
    arrays = random_3ddfa_arrays()
    arrays[key] = value
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(MorphableModelError, match=f"broken.npz: {message}"):
        MorphableModel.from_3ddfa_arrays(tmp_path / "broken.npz")


def test_missing_array_and_pickled_objects_are_refused(tmp_path):
    arrays = random_3ddfa_arrays()
    del arrays["w_exp"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(MorphableModelError, match="partial.npz: array 'w_exp' is missing"):
        MorphableModel.from_3ddfa_arrays(tmp_path / "partial.npz")
    arrays = random_3ddfa_arrays()
    arrays["u"] = np.array([{"evil": 1}], dtype=object)
    np.savez(tmp_path / "pickled.npz", **arrays)
    with pytest.raises(MorphableModelError, match="pickled.npz: cannot read as numpy arrays"):
        MorphableModel.from_3ddfa_arrays(tmp_path / "pickled.npz")


def test_bfm68_loader_reads_the_reference_bases(bfm68):
    assert bfm68.num_vertices == 68 and not bfm68.is_dense
    u = np.loadtxt(shared_path("bfm68", "u_base.txt"))
    np.testing.assert_array_equal(bfm68.mean, u.reshape(3, 68, order="F"))
    # The reference figure: nose tip (landmark 30) is the most forward point of the mean face.
    assert np.argmax(bfm68.mean[2]) == 30


def test_bfm68_wrong_file_is_named(tmp_path):
    for name, shape in (("u_base.txt", (204,)), ("w_shp_base.txt", (204, 40)), ("w_exp_base.txt", (204, 9))):
        np.savetxt(tmp_path / name, np.zeros(shape))
    message = r"w_exp_base.txt: expected shape \(204, 10\), got \(204, 9\)"
    with pytest.raises(MorphableModelError, match=message):
        MorphableModel.from_bfm68_dir(tmp_path)


def test_dense_subset_takes_its_landmarks_from_the_keypoint_model(bfm68):
    dense = MorphableModel.from_dense_subset(shared_path("bfm_subset", "bfm_4096.npz"), bfm68)
    assert dense.num_vertices == 4096 + 68 and dense.is_dense
    params = random_params(np.random.default_rng(4), 2)
    np.testing.assert_allclose(dense.landmarks(params), bfm68.landmarks(params), rtol=1e-12)
    # The subset and the keypoints are one face: every keypoint lies near the dense surface.
    mean = dense.mean
    gaps = np.linalg.norm(mean[:, :4096, None] - mean[:, None, 4096:], axis=0).min(axis=0)
    assert gaps.max() < 5000  # model units (about 5 mm)


def test_face_model_sources_by_name(bfm68, tmp_path):
    from models.face_models import load_face_model

    folder = shared_path("bfm68")
    assert load_face_model(f"bfm68:{folder}").identity == bfm68.identity
    assert load_face_model(str(folder)).identity == bfm68.identity
    dense = load_face_model(f"dense:{shared_path('bfm_subset', 'bfm_4096.npz')}+bfm68:{folder}")
    assert dense.num_vertices == 4164
    synthetic = load_face_model("synthetic")
    assert synthetic.triangles is not None and synthetic.is_dense
    with pytest.raises(MorphableModelError, match="nope: not a morphable model source"):
        load_face_model("nope")
