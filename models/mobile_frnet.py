"""Mobile-FRNet (Li et al., ICPR 2020) and its two ablations, as configurations of one network.

The body is MobileNetV2's table (Sandler et al., 2018): rows ``(t, c, n, s)`` -- expansion
ratio t, output channels c, repeats n, stride s of the first repeat -- of inverted-residual
blocks; a "Layer" is one row. Mobile-FRNet makes every block's depthwise stage multi-scale
(Res2Net-style hierarchical groups) ending in SGE (Spatial Group-wise Enhance), and ends every
Layer in SE (Squeeze-and-Excitation). The choices the paper leaves open (number of scales, how
the split and SGE are computed, SGE groups, SE reduction r = 1) and why each was made are in
``docs/architecture.md``; in short, they keep the paper's parameter budget (2.592 M against
its 2.60 M) and keep operations few and in onnxruntime's blocked layout, since batch-1 CPU
latency follows operations and layout conversions more than MACs.
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
MULTI_SCALE_GROUPS = 2  # fewest scales s of the hierarchy; see the module docstring
# onnxruntime's blocked (NCHWc) layout packs 16 channels with AVX-512 (8 with AVX2); a group
# width that is a whole number of blocks keeps the hierarchy's convs and additions in it.
NCHWC_BLOCK = 16
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


class SplitConvBNReLU6(nn.ModuleList):
    """A ConvBNReLU6 whose output channels come out as ``parts`` equal tensors, one conv each.

    The same function as one ConvBNReLU6 to ``out_channels`` followed by a channel split (a conv
    and a per-channel BN split by output channel are the convs and BNs of the parts), but with
    no Split node for onnxruntime to run outside its blocked layout. Input (B, C_in, H, W),
    output a tuple of ``parts`` tensors (B, out_channels / parts, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, parts: int, kernel_size: int = 1,
                 stride: int = 1) -> None:
        if parts < 1 or out_channels % parts:
            raise ValueError(f"{out_channels} channels cannot be split into {parts} equal parts")
        super().__init__(ConvBNReLU6(in_channels, out_channels // parts, kernel_size, stride)
                         for _ in range(parts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(part(x) for part in self)


def plain_depthwise(channels: int, stride: int) -> nn.Module:
    """MobileNetV2's depthwise stage: one 3x3 depthwise conv + BN + ReLU6."""
    return ConvBNReLU6(channels, channels, 3, stride, groups=channels)


def multi_scale_groups(hidden_channels: int, scales: int = MULTI_SCALE_GROUPS) -> int:
    """Scale count for a hierarchical stage on ``hidden_channels``: the smallest s >= ``scales``
    that splits them into equal groups of a whole number of onnxruntime's 16-channel blocks, or
    failing that (other width multipliers) the smallest s >= ``scales`` that divides them."""
    divisors = [s for s in range(scales, hidden_channels + 1) if hidden_channels % s == 0]
    if not divisors:
        raise ValueError(f"{hidden_channels} channels cannot be split into >= {scales} equal groups")
    aligned = [s for s in divisors if (hidden_channels // s) % NCHWC_BLOCK == 0]
    return (aligned or divisors)[0]


class HierarchicalInvertedResidual(nn.Module):
    """Mobile-FRNet's stride-1 block: an inverted residual with a Res2Net-style depthwise stage.

    The expanded channels are ``scales`` groups x_i; ``y_1 = K_1(x_1)``,
    ``y_i = K_i(x_i + y_(i-1))`` with ``K_i`` a 3x3 depthwise conv + BN + ReLU6; the y_i are
    concatenated and projected (1x1 conv + BN), then ``enhance`` (SGE) and the residual, as in
    :class:`InvertedResidual`. Each group is produced by its own 1x1 expansion conv (the rows of
    one expansion conv, see the module docstring). With ``expand_ratio == 1`` there is no
    expansion and the input is split: pass it as a tuple of ``scales`` tensors (what
    :class:`SplitConvBNReLU6` returns) or as one tensor. Input (B, C_in, H, W), output
    (B, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, scales: int,
                 enhance: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        hidden_dim = int(round(in_channels * expand_ratio))
        if scales < 2 or hidden_dim % scales:
            raise ValueError(f"{hidden_dim} channels cannot be split into {scales} equal groups")
        self.scales = scales
        self.width = hidden_dim // scales
        self.expand = (None if expand_ratio == 1 else
                       SplitConvBNReLU6(in_channels, hidden_dim, scales))
        self.convs = nn.ModuleList(ConvBNReLU6(self.width, self.width, 3, groups=self.width)
                                   for _ in range(scales))
        self.project = nn.Sequential(nn.Conv2d(hidden_dim, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels))
        self.enhance = enhance(out_channels) if enhance is not None else None
        self.use_residual = in_channels == out_channels

    @property
    def input_parts(self) -> int:
        """How many tensors the block takes its input as (``scales`` without an expansion)."""
        return self.scales if self.expand is None else 1

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        parts, residual = self.split_input(x)
        return self.finish(self.project_scales(self.hierarchy(parts)), residual)

    def split_input(self, x: torch.Tensor | tuple[torch.Tensor, ...]
                    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """The ``scales`` groups x_i (B, C/s, H, W) and the residual input (None without one)."""
        if isinstance(x, tuple):
            if self.expand is not None or len(x) != self.scales:
                raise ValueError(f"expected one tensor or {self.input_parts} parts, got {len(x)}")
            return x, (torch.cat(x, dim=1) if self.use_residual else None)
        residual = x if self.use_residual else None
        if self.expand is None:
            return torch.split(x, self.width, dim=1), residual
        return self.expand(x), residual  # scales x (B, C/s, H, W)

    def hierarchy(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The y_i (B, C/s, H, W): ``y_1 = K_1(x_1)``, ``y_i = K_i(x_i + y_(i-1))``."""
        outputs: list[torch.Tensor] = []
        for part, conv in zip(parts, self.convs, strict=True):
            outputs.append(conv(part if not outputs else part + outputs[-1]))
        return outputs

    def project_scales(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The y_i concatenated and projected (1x1 conv + BN): (B, C_out, H, W)."""
        return self.project(torch.cat(list(outputs), dim=1))

    def finish(self, out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The projected output (B, C_out, H, W) through ``enhance`` and the residual."""
        if self.enhance is not None:
            out = self.enhance(out)
        return out if residual is None else residual + out


class SpatialGroupEnhance(nn.Module):
    """SGE (Li, Hu, Yang 2019): per-group spatial attention from the group's mean feature.

    For each of ``groups`` channel groups: ``g = mean over positions of x``, ``c = g . x`` at each
    position, ``c`` normalised over positions, ``a = gamma * c_hat + beta``, ``x *= sigmoid(a)``.
    gamma starts at 0 and beta at 1, so the module starts as a uniform gate. Every tensor stays
    4-D: the sum over a group's channels is a grouped 1x1 conv with a constant all-ones kernel
    and a group's gate reaches its channels by an index gather (both buffers, not parameters).
    Input/output (B, C, H, W).
    """

    def __init__(self, channels: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        if groups < 1 or channels % groups:
            raise ValueError(f"SGE: {channels} channels cannot be split into {groups} groups")
        self.groups = groups
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(groups))
        self.beta = nn.Parameter(torch.ones(groups))
        width = channels // groups
        self.register_buffer("group_sum", torch.ones(groups, width, 1, 1), persistent=False)
        self.register_buffer("channel_group", torch.arange(channels) // width, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_feature = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        similarity = F.conv2d(x * mean_feature, self.group_sum, groups=self.groups)  # (B, G, H, W)
        # Normalising over positions with gamma/beta as the affine part is an instance norm.
        logits = F.instance_norm(similarity, weight=self.gamma, bias=self.beta, eps=self.eps)
        gate = torch.sigmoid(logits).index_select(1, self.channel_group)  # (B, C, H, W)
        return x * gate


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
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise conv, 1x1 linear projection, residual.

    ``enhance(channels)``, if given, runs on the projected output before the residual addition
    (Mobile-FRNet's SGE). The residual is used when the stride is 1 and the widths match.
    Input (B, in_channels, H, W), output (B, out_channels, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int,
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
            plain_depthwise(hidden_dim, stride),
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
    """Inverted residual with the multi-scale depthwise stage, no attention.

    At stride 2 the hierarchy cannot add strided and unstrided maps; Res2Net's answer there is
    independent per-group convs, which is a plain depthwise conv, built as one.
    """
    if stride != 1:
        return InvertedResidual(in_channels, out_channels, stride, expand_ratio)
    hidden_dim = int(round(in_channels * expand_ratio))
    return HierarchicalInvertedResidual(in_channels, out_channels, expand_ratio,
                                        multi_scale_groups(hidden_dim))


def mobile_block(in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> nn.Module:
    """Mobile-FRNet's MobileBlock: multi-scale depthwise stage and an SGE module."""
    if stride != 1:
        return InvertedResidual(in_channels, out_channels, stride, expand_ratio, enhance=grouped_sge)
    hidden_dim = int(round(in_channels * expand_ratio))
    return HierarchicalInvertedResidual(in_channels, out_channels, expand_ratio,
                                        multi_scale_groups(hidden_dim), enhance=grouped_sge)


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
        stem_channels = in_channels = round_channels(STEM_CHANNELS * width)
        layers: list[nn.Module] = []
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
        # A first block that takes its input in parts (no expansion to split) gets the stem's
        # output channels as that many convs: the same stem, without a Split node.
        parts = getattr(layers[0][0], "input_parts", 1) if layout else 1
        stem = (ConvBNReLU6(3, stem_channels, 3, stride=2) if parts == 1 else
                SplitConvBNReLU6(3, stem_channels, parts, kernel_size=3, stride=2))
        self.features = nn.Sequential(stem, *layers)
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
        pooled = F.adaptive_avg_pool2d(features, 1)  # (B, 1280, 1, 1)
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

