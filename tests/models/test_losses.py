import math

import numpy as np
import pytest
import torch

from models.losses import (
    FRNetLoss,
    sample_vertex_ids,
    wing,
    wing_vertex_loss,
    wpdc_loss,
    wpdc_weights,
)
from models.morphable import MorphableModel
from models.params import ParamStats
from tests.conftest import shared_path

NUM_VERTICES = 300


@pytest.fixture(scope="module")
def arrays():
    """A small random model in 3DDFA's interleaved layout, with BFM-like magnitudes."""
    rng = np.random.default_rng(0)
    return {
        "u": rng.normal(0, 5e4, 3 * NUM_VERTICES),
        "w_shp": rng.normal(0, 1e-1, (3 * NUM_VERTICES, 40)),
        "w_exp": rng.normal(0, 1e3, (3 * NUM_VERTICES, 10)),
        "keypoints": (3 * rng.choice(NUM_VERTICES, 68, replace=False)[:, None]
                      + np.arange(3)).ravel(),
    }


@pytest.fixture(scope="module")
def model(arrays, tmp_path_factory):
    path = tmp_path_factory.mktemp("bfm") / "random.npz"
    np.savez(path, **arrays)
    return MorphableModel.from_3ddfa_arrays(path)


@pytest.fixture(scope="module")
def stats():
    rng = np.random.default_rng(1)
    mean = np.zeros(62)
    mean[[0, 5, 10]] = 1.5e-3  # f*R diagonal at crop scale
    mean[[3, 7]] = 60.0
    std = np.abs(rng.normal(0, 1, 62)) + 0.1
    std[:12] *= 1e-4
    std[[3, 7, 11]] = 10.0
    std[12:52] *= 3e5
    return ParamStats(mean, std)


def random_pair(batch: int, seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(batch, 62, generator=generator, dtype=dtype)
    target = torch.randn(batch, 62, generator=generator, dtype=dtype)
    return pred, target


def reference_wpdc(arrays, stats, pred_w, target_w, vertex_ids):
    """The conventions doc, step by step, in float64 with plain loops over samples."""
    rows = np.stack([3 * vertex_ids, 3 * vertex_ids + 1, 3 * vertex_ids + 2], axis=1).ravel()
    u_b, w_shp_b, w_exp_b = arrays["u"][rows], arrays["w_shp"][rows], arrays["w_exp"][rows]
    w_b = np.concatenate([w_shp_b, w_exp_b], axis=1)  # (3M, 50)
    m = len(vertex_ids)
    weights = np.zeros_like(pred_w)
    for b in range(len(pred_w)):
        p = pred_w[b] * stats.std + stats.mean  # 1. de-whiten
        g = target_w[b] * stats.std + stats.mean
        shape = (u_b + w_shp_b @ g[12:52] + w_exp_b @ g[52:]).reshape(m, 3)  # 2. unrotated S
        n_x, n_y, n_z = np.sqrt((shape**2).sum(axis=0))
        dp = np.abs(p - g)
        w = np.zeros(62)
        for i in range(11):  # 3. pose
            if i in (0, 4, 8):
                w[i] = dp[i] * n_x
            elif i in (1, 5, 9):
                w[i] = dp[i] * n_y
            elif i in (2, 6, 10):
                w[i] = dp[i] * n_z
            else:  # 3, 7
                w[i] = dp[i] * math.sqrt(m)
        for j in range(12, 62):  # 4. shape and expression
            w[j] = 0.00057339936 * dp[j] * np.linalg.norm(w_b[:, j - 12])
        w = w + 1e-6  # 5.
        w = w / w.max()
        w[11] = 0.0
        weights[b] = w
    loss = np.mean(weights * (pred_w - target_w) ** 2)  # 6.
    return weights, loss


def reference_vertices(arrays, params, vertex_ids):
    """Posed vertices (3, M) by the doc's formula: interleaved vectors, Fortran reshape."""
    shape = arrays["u"] + arrays["w_shp"] @ params[12:52] + arrays["w_exp"] @ params[52:]
    camera = params[:12].reshape(3, 4)
    vertices = camera[:, :3] @ shape.reshape(3, -1, order="F") + camera[:, 3:]
    return vertices[:, vertex_ids]


def reference_wing(x, omega, epsilon):
    x = abs(x)
    if x < omega:
        return omega * math.log(1 + x / epsilon)
    return x - (omega - omega * math.log(1 + omega / epsilon))


def test_vertex_sample_is_68_keypoints_plus_132_random(model):
    ids = sample_vertex_ids(model, torch.Generator().manual_seed(0))
    assert ids.shape == (200,)
    np.testing.assert_array_equal(ids[:68], model.landmark_indices)
    assert len(set(ids[68:].tolist())) == 132 and ids.max() < NUM_VERTICES
    again = sample_vertex_ids(model, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(ids, again)
    keypoints_only = sample_vertex_ids(model.landmark_model(), torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(keypoints_only, np.arange(68))


def test_wpdc_weights_and_value_match_the_float64_reference(arrays, model, stats):
    pred, target = random_pair(5, seed=2)
    ids = sample_vertex_ids(model, torch.Generator().manual_seed(3))
    ref_weights, ref_loss = reference_wpdc(arrays, stats, pred.numpy(), target.numpy(), ids)
    weights = wpdc_weights(pred, target, stats, model, ids)
    np.testing.assert_allclose(weights.numpy(), ref_weights, rtol=1e-9, atol=1e-15)
    loss = wpdc_loss(pred, target, stats, model, ids)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-9)
    # float32 (the training dtype) stays close to the reference.
    loss32 = wpdc_loss(pred.float(), target.float(), stats, model, ids)
    assert loss32.item() == pytest.approx(ref_loss, rel=1e-4)


def test_wpdc_on_a_keypoint_only_model_uses_m_68(arrays, model, stats):
    pred, target = random_pair(3, seed=4)
    keypoints = model.landmark_model()
    ids = sample_vertex_ids(keypoints, torch.Generator().manual_seed(0))
    ref_weights, ref_loss = reference_wpdc(arrays, stats, pred.numpy(), target.numpy(),
                                           model.landmark_indices)
    np.testing.assert_allclose(wpdc_weights(pred, target, stats, keypoints, ids).numpy(),
                               ref_weights, rtol=1e-9, atol=1e-15)
    assert wpdc_loss(pred, target, stats, keypoints, ids).item() == pytest.approx(ref_loss,
                                                                                  rel=1e-9)


def test_wpdc_gradient_treats_the_weights_as_constants(model, stats):
    pred, target = random_pair(4, seed=5)
    pred.requires_grad_(True)
    ids = sample_vertex_ids(model, torch.Generator().manual_seed(6))
    wpdc_loss(pred, target, stats, model, ids).backward()
    weights = wpdc_weights(pred, target, stats, model, ids)
    expected = 2 * weights * (pred.detach() - target) / pred.numel()
    torch.testing.assert_close(pred.grad, expected)


@pytest.mark.parametrize("x", [0.0, 0.5, -1.0, 3.0, 9.999, 10.0, -12.5, 40.0])
def test_wing_equals_its_formula(x):
    value = wing(torch.tensor(x, dtype=torch.float64), omega=10.0, epsilon=2.0)
    assert value.item() == pytest.approx(reference_wing(x, 10.0, 2.0), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(("omega", "epsilon"), [(10.0, 2.0), (5.0, 0.5), (1.0, 3.0)])
def test_wing_is_continuous_at_omega(omega, epsilon):
    around = torch.tensor([omega - 1e-9, omega, omega + 1e-9, -omega - 1e-9, -omega + 1e-9],
                          dtype=torch.float64)
    values = wing(around, omega, epsilon)
    assert (values.max() - values.min()).item() < 1e-8
    with pytest.raises(ValueError, match="omega"):
        wing(around, omega=0.0, epsilon=epsilon)


def test_wing_vertex_loss_matches_the_plain_formula(arrays, model, stats):
    pred, target = random_pair(3, seed=7)
    ids = sample_vertex_ids(model, torch.Generator().manual_seed(8))
    values = []
    for b in range(3):
        p = pred[b].numpy() * stats.std + stats.mean
        g = target[b].numpy() * stats.std + stats.mean
        difference = reference_vertices(arrays, p, ids) - reference_vertices(arrays, g, ids)
        values += [reference_wing(d, 10.0, 2.0) for d in difference.ravel()]
    loss = wing_vertex_loss(pred, target, stats, model, ids, omega=10.0, epsilon=2.0)
    assert loss.item() == pytest.approx(np.mean(values), rel=1e-9)


def test_frnet_loss_is_the_weighted_sum_over_one_vertex_sample(model, stats):
    pred, target = random_pair(4, seed=9)
    loss_fn = FRNetLoss(0.7, 0.3, stats, model, omega=5.0, epsilon=1.0)
    parts = loss_fn(pred, target, torch.Generator().manual_seed(10))
    ids = sample_vertex_ids(model, torch.Generator().manual_seed(10))
    assert parts.wpdc.item() == pytest.approx(wpdc_loss(pred, target, stats, model, ids).item())
    assert parts.wing.item() == pytest.approx(
        wing_vertex_loss(pred, target, stats, model, ids, 5.0, 1.0).item())
    assert parts.total.item() == pytest.approx(0.7 * parts.wpdc.item() + 0.3 * parts.wing.item())
    with pytest.raises(ValueError, match="lambda1=-1"):
        FRNetLoss(-1.0, 1.0, stats, model)
    with pytest.raises(ValueError, match=r"\(4, 61\)"):
        loss_fn(pred[:, :61], target[:, :61], torch.Generator())


def test_a_perfect_prediction_costs_nothing(model, stats):
    _, target = random_pair(3, seed=11)
    pred = target.clone().requires_grad_(True)
    parts = FRNetLoss(1.0, 1.0, stats, model)(pred, target, torch.Generator().manual_seed(0))
    assert parts.total.item() == 0.0 and parts.wpdc.item() == 0.0 and parts.wing.item() == 0.0
    parts.total.backward()
    assert torch.isfinite(pred.grad).all()


def check_gradients_are_finite(model, stats, batches: int = 3):
    loss_fn = FRNetLoss(1.0, 0.5, stats, model)
    generator = torch.Generator().manual_seed(0)
    for seed in range(batches):
        pred, target = random_pair(8, seed=100 + seed, dtype=torch.float32)
        pred = (3 * pred).requires_grad_(True)
        parts = loss_fn(pred, target, generator)
        parts.total.backward()
        assert all(torch.isfinite(part) for part in parts)
        assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_gradients_are_finite_on_random_batches(model, stats):
    check_gradients_are_finite(model, stats)
    check_gradients_are_finite(model.landmark_model(), stats)


def test_gradients_are_finite_with_the_real_bfm_and_statistics(bfm68):
    bfm = shared_path("bfm68")
    stats = ParamStats.from_text_files(bfm / "param_mean.txt", bfm / "param_std.txt")
    check_gradients_are_finite(bfm68, stats)
    dense = MorphableModel.from_dense_subset(shared_path("bfm_subset", "bfm_4096.npz"), bfm68)
    check_gradients_are_finite(dense, stats)
