"""3DDFA_V2's regressor: MobileNetV1 (Howard et al., 2017) with a width multiplier.

A 3x3 stride-2 stem conv of 32 channels, then 13 depthwise-separable blocks (3x3 depthwise conv,
BN, ReLU, 1x1 conv, BN, ReLU), global average pooling and a linear layer to the 62 parameters.
Every width is ``int(width * channels)`` as in 3DDFA_V2, and the module names (``conv1``,
``bn1``, ``dw2_1`` ... ``dw6`` with ``conv_dw``/``bn_dw``/``conv_sep``/``bn_sep``, ``fc_param``)
are 3DDFA_V2's, so its released checkpoints load key for key. Its checkpoints also hold a
68-landmark head ``fc_lm`` (136 outputs) used only as a training aid; it is built on request
and left out of the parameter count of the regressor (3.27 M at width 1.0 without it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from models.params import NUM_PARAMS
from models.weights import read_state_dict

LOG = logging.getLogger(__name__)

STEM_CHANNELS = 32
NUM_LANDMARK_OUTPUTS = 136  # 68 landmarks x (x, y)
# name, output channels at width 1, stride: the rows of MobileNetV1's table.
MOBILENET_V1_LAYOUT: tuple[tuple[str, int, int], ...] = (
    ("dw2_1", 64, 1),
    ("dw2_2", 128, 2),
    ("dw3_1", 128, 1),
    ("dw3_2", 256, 2),
    ("dw4_1", 256, 1),
    ("dw4_2", 512, 2),
    ("dw5_1", 512, 1),
    ("dw5_2", 512, 1),
    ("dw5_3", 512, 1),
    ("dw5_4", 512, 1),
    ("dw5_5", 512, 1),
    ("dw5_6", 1024, 2),
    ("dw6", 1024, 1),
)


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv + BN + ReLU, then 1x1 conv + BN + ReLU.

    Input (B, in_channels, H, W), output (B, out_channels, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels,
                                 bias=False)
        self.bn_dw = nn.BatchNorm2d(in_channels)
        self.conv_sep = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn_sep = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn_dw(self.conv_dw(x)))
        return self.relu(self.bn_sep(self.conv_sep(x)))


def scaled_width(channels: int, width: float) -> int:
    """3DDFA_V2's rounding: ``int(channels * width)`` (truncation, no multiple-of-8 rule)."""
    scaled = int(channels * width)
    if scaled < 1:
        raise ValueError(f"width {width} leaves no channels of {channels}")
    return scaled


class MobileNetV1(nn.Module):
    """MobileNetV1 regressor of 3DDFA_V2; see the module docstring.

    Args:
        width: width multiplier (3DDFA_V2 ships 0.5 and 1.0).
        num_params: outputs of ``fc_param`` (62).
        landmark_head: also build ``fc_lm`` (136 outputs), needed to load 3DDFA_V2 checkpoints.

    Input (B, 3, H, W) (120x120, BGR, ``(x - 127.5) / 128`` for 3DDFA_V2 weights), output
    (B, num_params): the whitened parameter.
    """

    def __init__(self, width: float = 1.0, num_params: int = NUM_PARAMS,
                 landmark_head: bool = False) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if num_params < 1:
            raise ValueError(f"num_params must be >= 1, got {num_params}")
        self.width = width
        channels = scaled_width(STEM_CHANNELS, width)
        self.conv1 = nn.Conv2d(3, channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.block_names = [name for name, _, _ in MOBILENET_V1_LAYOUT]
        for name, out_channels, stride in MOBILENET_V1_LAYOUT:
            out_channels = scaled_width(out_channels, width)
            self.add_module(name, DepthwiseSeparable(channels, out_channels, stride))
            channels = out_channels
        self.fc_param = nn.Linear(channels, num_params)
        self.fc_lm = nn.Linear(channels, NUM_LANDMARK_OUTPUTS) if landmark_head else None
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features: (B, 3, H, W) -> (B, 1024 * width)."""
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_param(self.features(x))  # (B, num_params)

    def forward_with_landmarks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters (B, num_params) and the auxiliary landmark output (B, 136)."""
        if self.fc_lm is None:
            raise ValueError("this MobileNetV1 was built without a landmark head (landmark_head)")
        features = self.features(x)
        return self.fc_param(features), self.fc_lm(features)


def load_3ddfa_v2_checkpoint(path: Path, width: float) -> MobileNetV1:
    """A 3DDFA_V2 MobileNetV1 checkpoint as a model in eval mode, loaded with ``strict=True``.

    Accepts ``{"state_dict": ...}`` (3DDFA_V2's format), ``{"model": ...}`` or a bare state dict,
    with or without ``module.`` prefixes; read with ``weights_only=True`` (no pickled code).
    The landmark head is built when the checkpoint has ``fc_lm``; ``num_params`` follows
    ``fc_param``. Raises ValueError when the file is unreadable or does not fit ``width``.
    """
    path = Path(path)
    state_dict = read_state_dict(path)
    if "fc_param.weight" not in state_dict or "conv1.weight" not in state_dict:
        raise ValueError(f"{path}: not a 3DDFA_V2 MobileNetV1 checkpoint (no conv1/fc_param keys)")
    stem_channels = state_dict["conv1.weight"].shape[0]
    if stem_channels != scaled_width(STEM_CHANNELS, width):
        raise ValueError(f"{path}: stem has {stem_channels} channels, which is width "
                         f"{stem_channels / STEM_CHANNELS}, not the width {width} asked for")
    model = MobileNetV1(width, num_params=state_dict["fc_param.weight"].shape[0],
                        landmark_head="fc_lm.weight" in state_dict)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: does not fit a MobileNetV1 of width {width}: {err}") from err
    LOG.info("loaded %s (width %s, %d tensors)", path, width, len(state_dict))
    return model.eval()
