"""Mobile-FRNet (Li et al., ICPR 2020) and its two ablations, as configurations of one network.

The body is MobileNetV2's table (Sandler et al., 2018): a 3x3 stride-2 stem conv of 32 channels,
then Layers of inverted-residual blocks given as rows ``(t, c, n, s)`` -- expansion ratio t,
output channels c, repeats n, stride s of the first repeat -- then a 1x1 conv to 1280 channels,
global average pooling and a 1x1 conv to the 62 parameters. A "Layer" is one row of the table.

Mobile-FRNet changes two things (the "MobileBlock" and the Layer attention):

* every block's depthwise stage becomes a multi-scale representation and the block ends in an
  SGE module (Spatial Group-wise Enhance, Li, Hu, Yang 2019);
* every Layer ends in an SE module (Squeeze-and-Excitation, Hu et al. 2018).

Choices the paper leaves open, and why they were made so:

* **Multi-scale form** -- a Res2Net-style hierarchical split of the depthwise stage into
  ``scales = 4`` equal channel groups (Res2Net's default): ``y_1 = K_1(x_1)``,
  ``y_i = K_i(x_i + y_(i-1))``, concatenated and fed to the block's 1x1 projection (which plays
  Res2Net's closing 1x1). Each ``K_i`` is a 3x3 depthwise conv + BN + ReLU6, so group i sees a
  (2i+1)x(2i+1) window. Unlike Res2Net, the first group is convolved too (``K_1``, not an
  identity): the depthwise conv is the block's only spatial operator, and an identity group
  would leave a quarter of the channels with no spatial context at all; with ``K_1`` the block
  keeps the plain block's 3x3 view for every channel and only *adds* larger ones. It also keeps
  the parameter count of the plain block, where an identity group would remove a quarter of the
  depthwise weights -- the paper's no-attention net is larger than MobileNetV2, not smaller.
  Blocks with stride 2 cannot add a strided ``y_(i-1)`` to an unstrided ``x_i``; there, as in
  Res2Net's first block of a stage, the groups are convolved independently, which is exactly
  a plain 3x3 depthwise conv, so those blocks use one (4 of the 17 blocks).
* **Where SGE sits** -- on the block's output, after the projection's BN and before the residual
  addition, as in the SGE paper's ResNets ("after the last BatchNorm of each bottleneck"). There
  it runs on the narrow output channels (16-320) rather than the 6x wider expanded ones.
* **SGE groups** -- the paper's G = 64 does not divide 24, 96 or 160 output channels, and 16 or
  32 channels cannot hold 64 groups. ``sge_groups`` takes ``gcd(C, 64)`` groups, halved until
  every group holds at least 2 channels (DAMDNet's 2 channels a group as the floor): 64 groups
  on 320 channels, 32 on 64/96/160, 16 on 32, 8 on 16 and 24. Its normalisation of ``c`` over
  positions is an instance norm whose affine weight and bias are SGE's gamma (init 0) and beta
  (init 1): the same formula as SGE (biased variance, eps inside the root; gamma absorbs the
  difference from SGE's unbiased std), and a single ONNX ``InstanceNormalization`` node.
* **Where SE sits** -- on each Layer's output, after the last block's residual addition: the
  paper says "after every Layer", so one SE per table row, 7 in all.
* **SE reduction** -- ``r = 1`` (no squeeze bottleneck). The 7 Layer outputs have sum c^2 =
  143,168, so SE adds about ``2 * 143,168 / r`` weights; the paper's attention budget
  (2.60 M - 2.40 M = 0.20 M) implies r ~ 1.4. r = 1 gives 2.59 M in all (paper 2.60 M);
  r = 2 gives 2.45 M, 5.8 % under the paper, r = 4 and 16 lower still. ECA-Net (Wang et al.,
  CVPR 2020) found SE's dimensionality reduction harmful, so r = 1 is no odd choice either.
* **Head** -- the 1x1 conv to 62 has a bias and no dropout (the paper mentions none).
* **Speed** -- the stride-2 depthwise stages as one conv and SGE as reshapes plus one instance
  norm are the computations above in fewer ONNX nodes; the literal forms (split, 4 strided convs
  and a concatenation; the SGE reference code's mean/std chain) took 1.25-1.33x as long in
  single-thread onnxruntime. Batch-1 CPU latency follows node count more than MACs, so
  Mobile-FRNet (1.9x fewer MACs) is still slower than 3DDFA_V2's MobileNetV1.

Parameter counts at 120x120 with 62 outputs: Mobile-FRNet 2.592 M (paper 2.60), no-attention
2.303 M (paper 2.40, -4.0 %), MobileNetV2 2.303 M (paper 2.38, -3.2 %). The multi-scale form
costs no parameters, so the two ablations are equal where the paper has them 0.02 M apart. The
0.08 M by which a plain torchvision-layout MobileNetV2 with a 62-output head falls short of the
paper's MobileNetV2 the paper does not explain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from models.params import NUM_PARAMS

# t, c, n, s: expansion ratio, output channels, repeats, stride of the first repeat.
MOBILENET_V2_LAYOUT: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
MULTI_SCALE_GROUPS = 4  # Res2Net's default scale s
SGE_MAX_GROUPS = 64  # G of the Mobile-FRNet paper
SGE_MIN_GROUP_WIDTH = 2  # DAMDNet's channels per SGE group
SE_REDUCTION = 1  # see the module docstring
# MobileNetV2 rounds every width to a multiple of 8 (torchvision's _make_divisible).
CHANNEL_DIVISOR = 8

# A block factory: (in_channels, out_channels, stride, expand_ratio) -> module.
BlockFactory = Callable[[int, int, int, int], nn.Module]
# A Layer attention factory: channels -> module, or None for no attention.
AttentionFactory = Callable[[int], nn.Module] | None


def round_channels(channels: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """Nearest multiple of ``divisor`` that does not lose more than 10 % (MobileNetV2's rule)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


def sge_groups(channels: int) -> int:
    """SGE group count for ``channels``: gcd(C, 64), halved until each group holds >= 2 channels."""
    groups = math.gcd(channels, SGE_MAX_GROUPS)
    while groups > 1 and channels // groups < SGE_MIN_GROUP_WIDTH:
        groups //= 2
    return groups


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU6; ``groups=channels`` makes it depthwise."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


def plain_depthwise(channels: int, stride: int) -> nn.Module:
    """MobileNetV2's depthwise stage: one 3x3 depthwise conv + BN + ReLU6."""
    return ConvBNReLU6(channels, channels, 3, stride, groups=channels)


class HierarchicalDepthwise(nn.Module):
    """Res2Net-style multi-scale depthwise stage (see the module docstring).

    The channels are split into ``scales`` groups; ``y_1 = K_1(x_1)``, ``y_i = K_i(x_i + y_(i-1))``
    with ``K_i`` a 3x3 depthwise conv + BN + ReLU6; the output is the concatenation of the y_i.
    Input and output (B, C, H, W); stride 1 only (see :func:`multi_scale_depthwise`).
    """

    def __init__(self, channels: int, scales: int = MULTI_SCALE_GROUPS) -> None:
        super().__init__()
        if scales < 1 or channels % scales:
            raise ValueError(f"{channels} channels cannot be split into {scales} equal groups")
        self.width = channels // scales
        self.convs = nn.ModuleList(
            ConvBNReLU6(self.width, self.width, 3, 1, groups=self.width) for _ in range(scales)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        previous = None
        for part, conv in zip(torch.split(x, self.width, dim=1), self.convs, strict=True):
            previous = conv(part if previous is None else part + previous)  # (B, C/s, H, W)
            outputs.append(previous)
        return torch.cat(outputs, dim=1)  # (B, C, H, W)


def multi_scale_depthwise(channels: int, stride: int,
                          scales: int = MULTI_SCALE_GROUPS) -> nn.Module:
    """Mobile-FRNet's depthwise stage: hierarchical at stride 1, a plain depthwise at stride 2.

    At stride 2 the hierarchy cannot add strided and unstrided maps; Res2Net's answer there is
    independent per-group convs, which is a plain depthwise conv, built as one for speed.
    """
    if stride != 1:
        return plain_depthwise(channels, stride)
    return HierarchicalDepthwise(channels, scales)


class SpatialGroupEnhance(nn.Module):
    """SGE (Li, Hu, Yang 2019): per-group spatial attention from the group's mean feature.

    For each of ``groups`` channel groups: ``g = mean over positions of x``, ``c = g . x`` at each
    position, ``c`` normalised over positions, ``a = gamma * c_hat + beta``, ``x *= sigmoid(a)``.
    gamma starts at 0 and beta at 1, so the module starts as a uniform gate. Input/output
    (B, C, H, W).
    """

    def __init__(self, channels: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        if groups < 1 or channels % groups:
            raise ValueError(f"SGE: {channels} channels cannot be split into {groups} groups")
        self.groups = groups
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(groups))
        self.beta = nn.Parameter(torch.ones(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.unflatten(1, (self.groups, -1))  # (B, G, C/G, H, W)
        mean_feature = grouped.mean(dim=(3, 4), keepdim=True)  # (B, G, C/G, 1, 1)
        similarity = (grouped * mean_feature).sum(dim=2)  # (B, G, H, W)
        # Normalising over positions with gamma/beta as the affine part is an instance norm.
        logits = F.instance_norm(similarity, weight=self.gamma, bias=self.beta, eps=self.eps)
        return (grouped * torch.sigmoid(logits).unsqueeze(2)).flatten(1, 2)  # (B, C, H, W)


def grouped_sge(channels: int) -> SpatialGroupEnhance:
    """SGE with :func:`sge_groups` groups."""
    return SpatialGroupEnhance(channels, sge_groups(channels))


class SqueezeExcitation(nn.Module):
    """SE (Hu et al. 2018): channel gates from the global average, ``C -> C/r -> C``, sigmoid.

    Input/output (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        if reduction < 1 or channels % reduction:
            raise ValueError(f"SE: reduction {reduction} does not divide {channels} channels")
        squeezed = channels // reduction
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        gates = torch.sigmoid(self.expand(F.relu(self.reduce(gates))))
        return x * gates


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, a depthwise stage, 1x1 linear projection, residual.

    ``depthwise(channels, stride)`` builds the spatial stage (plain or multi-scale);
    ``enhance(channels)``, if given, runs on the projected output before the residual addition
    (Mobile-FRNet's SGE). The residual is used when the stride is 1 and the widths match.
    Input (B, in_channels, H, W), output (B, out_channels, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int,
                 depthwise: Callable[[int, int], nn.Module] = plain_depthwise,
                 enhance: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden_dim = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden_dim, kernel_size=1))
        layers += [
            depthwise(hidden_dim, stride),
            nn.Conv2d(hidden_dim, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if enhance is not None:
            layers.append(enhance(out_channels))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


def mobilenet_v2_block(in_channels: int, out_channels: int, stride: int,
                       expand_ratio: int) -> nn.Module:
    """The plain inverted residual."""
    return InvertedResidual(in_channels, out_channels, stride, expand_ratio)


def multi_scale_block(in_channels: int, out_channels: int, stride: int,
                      expand_ratio: int) -> nn.Module:
    """Inverted residual with the multi-scale depthwise stage, no attention."""
    return InvertedResidual(in_channels, out_channels, stride, expand_ratio,
                            depthwise=multi_scale_depthwise)


def mobile_block(in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> nn.Module:
    """Mobile-FRNet's MobileBlock: multi-scale depthwise stage and an SGE module."""
    return InvertedResidual(in_channels, out_channels, stride, expand_ratio,
                            depthwise=multi_scale_depthwise,
                            enhance=grouped_sge)


class MobileFRNet(nn.Module):
    """The MobileNetV2-layout regressor; see the module docstring.

    Args:
        block: builds each block from (in_channels, out_channels, stride, expand_ratio).
        layer_attention: builds the module after each Layer from its channels, or None.
        num_params: outputs of the head (62 for the 3DMM parameter).
        width: multiplier of every width but the 1280 (which only grows), as in MobileNetV2.
        layout: rows (t, c, n, s) of the table.

    Input (B, 3, H, W) (120x120 in this project), output (B, num_params).
    """

    def __init__(self, block: BlockFactory = mobile_block,
                 layer_attention: AttentionFactory = SqueezeExcitation,
                 num_params: int = NUM_PARAMS, width: float = 1.0,
                 layout: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_LAYOUT) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if num_params < 1:
            raise ValueError(f"num_params must be >= 1, got {num_params}")
        in_channels = round_channels(STEM_CHANNELS * width)
        layers: list[nn.Module] = [ConvBNReLU6(3, in_channels, 3, stride=2)]
        for t, c, n, s in layout:
            out_channels = round_channels(c * width)
            blocks = [block(in_channels if i == 0 else out_channels, out_channels,
                            s if i == 0 else 1, t) for i in range(n)]
            if layer_attention is not None:
                blocks.append(layer_attention(out_channels))
            layers.append(nn.Sequential(*blocks))
            in_channels = out_channels
        last_channels = round_channels(LAST_CHANNELS * max(1.0, width))
        layers.append(ConvBNReLU6(in_channels, last_channels, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(last_channels, num_params, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # A small head keeps the first predictions near the whitened mean (zero).
        nn.init.normal_(self.head.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)  # (B, 1280, H/32, W/32)
        pooled = features.mean(dim=(2, 3), keepdim=True)  # (B, 1280, 1, 1)
        return self.head(pooled).flatten(1)  # (B, num_params)


def mobile_frnet(num_params: int = NUM_PARAMS, width: float = 1.0) -> MobileFRNet:
    """Mobile-FRNet: MobileBlocks (multi-scale + SGE) and an SE after every Layer."""
    return MobileFRNet(mobile_block, SqueezeExcitation, num_params, width)


def mobile_frnet_no_attention(num_params: int = NUM_PARAMS, width: float = 1.0) -> MobileFRNet:
    """The paper's ablation without attention: multi-scale blocks, no SGE, no SE."""
    return MobileFRNet(multi_scale_block, None, num_params, width)


def mobilenet_v2(num_params: int = NUM_PARAMS, width: float = 1.0) -> MobileFRNet:
    """Plain MobileNetV2 with the 62-output head."""
    return MobileFRNet(mobilenet_v2_block, None, num_params, width)

