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
  ``s`` equal channel groups: ``y_1 = K_1(x_1)``, ``y_i = K_i(x_i + y_(i-1))``, concatenated
  and fed to the block's 1x1 projection (which plays Res2Net's closing 1x1). Each ``K_i`` is a
  3x3 depthwise conv + BN + ReLU6, so group i sees a (2i+1)x(2i+1) window. Unlike Res2Net, the
  first group is convolved too (``K_1``, not an identity): the depthwise conv is the block's
  only spatial operator, and an identity group would leave those channels with no spatial
  context at all; with ``K_1`` the block keeps the plain block's 3x3 view for every channel and
  only *adds* larger ones. It also keeps the parameter count of the plain block, where an
  identity group would remove depthwise weights -- the paper's no-attention net is larger than
  MobileNetV2, not smaller. Blocks with stride 2 cannot add a strided ``y_(i-1)`` to an
  unstrided ``x_i``; there, as in Res2Net's first block of a stage, the groups are convolved
  independently, which is exactly a plain 3x3 depthwise conv, so those blocks use one (4 of
  the 17 blocks).
* **How many scales** -- ``s = 2`` (3x3 and 5x5 views), and 3 on the one block with 144
  expanded channels, where halves of 72 would not be whole 16-channel blocks
  (:func:`multi_scale_groups`). The paper gives no s; Res2Net's default is 4. Every extra
  scale is three more sequential operations per block (a 1x1 conv, an addition, a depthwise
  conv), and at batch 1 on a CPU these cost far more than their arithmetic: in single-thread
  onnxruntime s >= 3 made the whole network 1.12x and s >= 4 1.22x as slow as s = 2 (figures
  below). The group widths are kept whole multiples of 16 channels because onnxruntime's CPU
  convolutions run in a blocked layout of 16 channels (AVX-512; 8 with AVX2): a group that is
  not whole blocks falls back to plain NCHW kernels with a layout conversion on each side.
* **How the split is computed** -- each group ``x_i`` comes from its own 1x1 expansion conv +
  BN + ReLU6 (:class:`SplitConvBNReLU6`): these are the rows of the block's one expansion conv
  and the channels of its BN, so the function and the parameters are those of one expansion
  followed by a channel split. On the first block (t = 1, no expansion) the stem conv is split
  the same way and hands the block its two halves. Split and Slice have no blocked-layout
  kernel in onnxruntime; the previous form (one expansion conv, then ``torch.split``) put two
  layout conversions and an unblocked addition around every block.
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
* **How SGE is computed** -- with 4-D tensors only: the mean feature by a mean over positions,
  the per-group sum of ``g * x`` by a grouped 1x1 conv with a constant all-ones kernel, and a
  group's gate copied to its channels by an index gather. The earlier 5-D view of the groups
  made the exporter spell out the dynamic batch size as Shape/Slice/Concat/Reshape arithmetic
  (about 190 of its 645 onnxruntime nodes) and forced layout conversions; the grouped all-ones
  conv is counted by the flop counter (C*H*W multiply-adds per block, 0.17 M in all) where the
  equivalent elementwise sums were not. The instance norm has no blocked-layout kernel, so each
  SGE still runs between two layout conversions: about 10 onnxruntime nodes per block.
* **Where SE sits** -- on each Layer's output, after the last block's residual addition: the
  paper says "after every Layer", so one SE per table row, 7 in all.
* **SE reduction** -- ``r = 1`` (no squeeze bottleneck). The 7 Layer outputs have sum c^2 =
  143,168, so SE adds about ``2 * 143,168 / r`` weights; the paper's attention budget
  (2.60 M - 2.40 M = 0.20 M) implies r ~ 1.4. r = 1 gives 2.59 M in all (paper 2.60 M);
  r = 2 gives 2.45 M, 5.8 % under the paper, r = 4 and 16 lower still. ECA-Net (Wang et al.,
  CVPR 2020) found SE's dimensionality reduction harmful, so r = 1 is no odd choice either.
  Its two fully connected layers are 1x1 convs on the pooled (B, C, 1, 1) features.
* **Head** -- global average pooling (one ``GlobalAveragePool``, which stays in the blocked
  layout), then the 1x1 conv to 62 with a bias and no dropout (the paper mentions none).

**Speed.** Batch-1 single-thread CPU latency follows the number of operations and layout
conversions more than MACs. Measured with ``benchmarks/onnx_latency.py``'s session (one
thread, all graph optimisations) on Machine A of BENCHMARKS.md, as the median of per-round
latency ratios to 3DDFA_V2's MobileNetV1 (177 M MACs) in one interleaved run of 2000 calls
each: the previous form (4 scales by Split/Concat, SGE on 5-D views) 1.30; this form 0.985;
this form with s >= 3 1.10, with s >= 4 1.20; with the previous SGE 1.08; with the previous
Split/Concat multi-scale stage (s = 4) 1.20. MobileNetV2 was 0.68 and the no-attention net
0.76: the 17 SGE and 7 SE modules (205 of Mobile-FRNet's 316 nodes after onnxruntime's graph
optimisation; the no-attention net has 111, MobileNetV2 56, MobileNetV1 30) cost 0.23 of
MobileNetV1's latency, the multi-scale stages 0.08. The margin is small, and a machine busy
with other work slows these many small operations more than MobileNetV1's few large
convolutions (the same comparison has measured 1.05 under load).

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
        if isinstance(x, tuple):
            if self.expand is not None or len(x) != self.scales:
                raise ValueError(f"expected one tensor or {self.input_parts} parts, got {len(x)}")
            parts, x = x, (torch.cat(x, dim=1) if self.use_residual else None)
        elif self.expand is None:
            parts = torch.split(x, self.width, dim=1)
        else:
            parts = self.expand(x)  # scales x (B, C/s, H, W)
        outputs = []
        previous = None
        for part, conv in zip(parts, self.convs, strict=True):
            previous = conv(part if previous is None else part + previous)  # (B, C/s, H, W)
            outputs.append(previous)
        out = self.project(torch.cat(outputs, dim=1))  # (B, C_out, H, W)
        if self.enhance is not None:
            out = self.enhance(out)
        return x + out if self.use_residual else out


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

