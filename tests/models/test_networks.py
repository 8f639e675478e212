import numpy as np
import pytest
import torch
from torch import nn

from models.architectures import ARCHITECTURES, build_model, count_complexity, load_model
from models.mobile_frnet import (
    MOBILENET_V2_LAYOUT,
    ConvBNReLU6,
    HierarchicalInvertedResidual,
    InvertedResidual,
    SpatialGroupEnhance,
    SplitConvBNReLU6,
    multi_scale_groups,
    sge_groups,
)
from models.mobilenet_v1 import MobileNetV1, load_3ddfa_v2_checkpoint
from tests.conftest import shared_path

# Li et al., ICPR 2020, Table (params in millions).
PAPER_PARAMS = {"mobile-frnet": 2.60, "mobile-frnet-noatt": 2.40, "mobilenet-v2": 2.38}
# 3DDFA_V2's published MobileNetV1 (width 1.0) figures at 1x3x120x120.
MB1_PARAMS = 3.27e6
MB1_PUBLISHED_MACS = 183.5e6


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_maps_a_batch_of_crops_to_62_params(name):
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 120, 120, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (3, 62)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_parameter_counts_are_within_5_percent_of_the_paper(name):
    params = sum(p.numel() for p in build_model(name).parameters())
    assert abs(params / 1e6 - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.05


def test_ablations_differ_only_in_attention():
    full, no_attention = build_model("mobile-frnet"), build_model("mobile-frnet-noatt")
    kinds = {type(m).__name__ for m in full.modules()} - {type(m).__name__ for m in
                                                           no_attention.modules()}
    assert kinds == {"SpatialGroupEnhance", "SqueezeExcitation"}
    blocks = sum(n for _, _, n, _ in MOBILENET_V2_LAYOUT)
    assert sum(isinstance(m, SpatialGroupEnhance) for m in full.modules()) == blocks
    # Every stride-1 block is multi-scale; the 4 stride-2 blocks' independent groups are a plain
    # depthwise conv (see the module docstring).
    for model in (full, no_attention):
        hierarchical = [m for m in model.modules() if isinstance(m, HierarchicalInvertedResidual)]
        plain = [m for m in model.modules() if isinstance(m, InvertedResidual)]
        assert len(hierarchical) == blocks - 4 and len(plain) == 4
        assert all(m.scales >= 2 for m in hierarchical)
    assert not any(isinstance(m, HierarchicalInvertedResidual)
                   for m in build_model("mobilenet-v2").modules())


def test_mobilenet_v1_matches_3ddfa_v2_published_size():
    model = build_model("mobilenet-v1", width=1.0)
    figures = count_complexity(model)
    assert abs(figures["params"] - MB1_PARAMS) < 0.005e6
    # torch's counter sees convolutions and matrix products only: 177.4 M MACs.
    assert figures["macs"] == 177_436_800 and figures["flops"] == 2 * figures["macs"]
    # 3DDFA_V2's 183.5 M also charges BatchNorm, 4 ops per output element.
    bn_elements = []
    hooks = [m.register_forward_hook(lambda mod, i, o: bn_elements.append(o.numel()))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 120, 120))
    for hook in hooks:
        hook.remove()
    assert abs(figures["macs"] + 4 * sum(bn_elements) - MB1_PUBLISHED_MACS) < 0.1e6


def test_count_complexity_restores_training_mode():
    model = build_model("mobilenet-v2").train()
    count_complexity(model)
    assert model.training


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError, match="resnet-50.*mobile-frnet.*mobilenet-v1"):
        build_model("resnet-50")
    with pytest.raises(ValueError, match="width"):
        build_model("mobilenet-v1", width=0.0)


def test_sge_groups_divide_channels_with_at_least_two_per_group():
    for _, channels, _, _ in MOBILENET_V2_LAYOUT:
        groups = sge_groups(channels)
        assert channels % groups == 0 and channels // groups >= 2 and groups <= 64
    assert sge_groups(320) == 64


def test_sge_matches_its_formula_and_starts_as_a_uniform_gate():
    x = torch.randn(2, 12, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sge = SpatialGroupEnhance(12, 3).double()
    # gamma = 0, beta = 1: every position gated by sigmoid(1).
    torch.testing.assert_close(sge(x), x * torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)))
    with torch.no_grad():
        sge.gamma.copy_(torch.tensor([0.5, -1.0, 2.0]))
        sge.beta.copy_(torch.tensor([0.1, 0.2, -0.3]))
    expected = torch.empty_like(x)
    for b in range(2):
        for g in range(3):
            group = x[b, 4 * g : 4 * g + 4]  # (4, H, W)
            mean_feature = group.mean(dim=(1, 2))  # (4,)
            c = (group * mean_feature[:, None, None]).sum(0)  # (H, W)
            c_hat = (c - c.mean()) / torch.sqrt(c.var(unbiased=False) + sge.eps)
            gate = torch.sigmoid(sge.gamma[g] * c_hat + sge.beta[g])
            expected[b, 4 * g : 4 * g + 4] = group * gate
    torch.testing.assert_close(sge(x), expected.detach())


def _randomise_batchnorms(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor in (module.weight, module.bias, module.running_mean):
                tensor.data.normal_(0.0, 0.5, generator=generator)
            module.running_var.data.uniform_(0.5, 2.0, generator=generator)


def test_hierarchical_block_feeds_each_group_the_previous_output():
    block = HierarchicalInvertedResidual(8, 8, expand_ratio=3, scales=3).double().eval()
    _randomise_batchnorms(block, 0)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x1, x2, x3 = (expand(x) for expand in block.expand)
    y1 = block.convs[0](x1)
    y2 = block.convs[1](x2 + y1)
    y3 = block.convs[2](x3 + y2)
    torch.testing.assert_close(block(x), x + block.project(torch.cat([y1, y2, y3], dim=1)))
    with pytest.raises(ValueError, match="10 channels"):
        HierarchicalInvertedResidual(5, 5, expand_ratio=2, scales=4)


def test_split_convs_are_one_conv_followed_by_a_channel_split():
    split = SplitConvBNReLU6(5, 12, parts=3, kernel_size=3, stride=2).double().eval()
    _randomise_batchnorms(split, 2)
    whole = ConvBNReLU6(5, 12, 3, stride=2).double().eval()
    with torch.no_grad():
        whole[0].weight.copy_(torch.cat([part[0].weight for part in split]))
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(whole[1], name).copy_(torch.cat([getattr(part[1], name) for part in split]))
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for part, expected in zip(split(x), torch.split(whole(x), 4, dim=1), strict=True):
        torch.testing.assert_close(part, expected)


def test_block_without_expansion_takes_its_input_split_or_whole():
    block = HierarchicalInvertedResidual(32, 16, expand_ratio=1, scales=2).double().eval()
    _randomise_batchnorms(block, 4)
    assert block.input_parts == 2
    x = torch.randn(1, 32, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(block(tuple(torch.split(x, 16, dim=1))), block(x))
    with pytest.raises(ValueError, match="parts"):
        block(tuple(torch.split(x, 8, dim=1)))
    # The network hands the first (t = 1) block its input as the stem's parts.
    stem = build_model("mobile-frnet").features[0]
    assert isinstance(stem, SplitConvBNReLU6) and len(stem) == 2


def test_multi_scale_groups_are_whole_nchwc_blocks_where_possible():
    # Hidden widths of MobileNetV2's stride-1 blocks at width 1.0.
    assert {h: multi_scale_groups(h) for h in (32, 144, 192, 384, 576, 960)} == {
        32: 2, 144: 3, 192: 2, 384: 2, 576: 2, 960: 2}
    assert multi_scale_groups(16) == 2  # no 16-aligned split: the fewest equal groups
    assert multi_scale_groups(192, scales=4) == 4
    with pytest.raises(ValueError, match="7 channels"):
        multi_scale_groups(7, scales=8)


def test_3ddfa_v2_checkpoint_loads_strict_and_gives_finite_params():
    path = shared_path("peers", "3ddfa_v2_mb05_120x120.pth")
    model = load_3ddfa_v2_checkpoint(path, width=0.5)
    assert isinstance(model, MobileNetV1) and not model.training
    with torch.no_grad():
        params, landmarks = model.forward_with_landmarks(torch.randn(2, 3, 120, 120))
    assert params.shape == (2, 62) and landmarks.shape == (2, 136)
    assert torch.isfinite(params).all()
    with pytest.raises(ValueError, match="width 0.5, not the width 1.0"):
        load_3ddfa_v2_checkpoint(path, width=1.0)
    assert isinstance(load_model("mobilenet-v1", 0.5, path), MobileNetV1)


def test_3ddfa_v2_checkpoint_reproduces_its_measured_nme_on_image00427():
    """The data README's measured 2.78 % NME: the architecture is 3DDFA_V2's, ReLU and all."""
    cv2 = pytest.importorskip("cv2")
    from models.morphable import MorphableModel
    from models.params import ParamStats

    model = load_3ddfa_v2_checkpoint(shared_path("peers", "3ddfa_v2_mb05_120x120.pth"), 0.5)
    crop = cv2.imread(str(shared_path("aflw2000-3d-image00427", "image00427_roi_crop_256.png")))
    crop = cv2.resize(crop, (120, 120), interpolation=cv2.INTER_LINEAR)  # BGR, as 3DDFA_V2
    image = torch.from_numpy((crop.astype(np.float32) - 127.5) / 128).permute(2, 0, 1)[None]
    with torch.no_grad():
        whitened = model(image).numpy()[0]
    bfm = shared_path("bfm68")
    stats = ParamStats.from_text_files(bfm / "param_mean_v2.txt", bfm / "param_std_v2.txt")
    landmarks = MorphableModel.from_bfm68_dir(bfm).landmarks(stats.dewhiten(whitened))
    sx, sy, ex, ey = np.load(shared_path("aflw2000-3d", "protocol",
                                         "AFLW2000-3D_crop.roi_box.npy"))[255][:4]
    # 3DDFA_V2's crop frame: x - 1, y = 120 - y; then back through the ROI box.
    predicted = np.stack([(landmarks[0] - 1) * (ex - sx) / 120 + sx,
                          (120 - landmarks[1]) * (ey - sy) / 120 + sy])
    truth = np.load(shared_path("aflw2000-3d", "protocol", "AFLW2000-3D.pts68.npy"))[255][:2]
    size = np.sqrt(np.ptp(truth[0]) * np.ptp(truth[1]))
    nme = np.linalg.norm(predicted - truth, axis=0).mean() / size * 100
    assert abs(nme - 2.78) < 0.02
