"""The inference form of a regressor: the function of the training form, in a cheaper graph.

Exporting the training form as it is hands ONNX Runtime what the network was trained as. Where
an equivalent arrangement of the same arithmetic runs faster in ONNX Runtime's CPU kernels,
:func:`inference_form` builds it from the trained modules, leaving the trained model untouched:

* **A hierarchical block's projection** (Mobile-FRNet's multi-scale blocks): the 1x1 projection
  of the concatenated scales ``P [y_1; ...; y_s]`` is the sum ``P_1 y_1 + ... + P_s y_s`` of
  one conv per scale (``P_i`` the columns of ``P`` that meet ``y_i``), with the projection's
  BatchNorm folded into them. ONNX Runtime adds each sum into the next conv's output buffer
  (its blocked-layout conv takes a tensor to accumulate into), so the Concat node and its copy
  of every expanded channel are gone, while the multiply-adds stay the same.

Everything else is exported as trained; batch norms after convolutions are folded by the
exporter and by ONNX Runtime either way. Outputs agree with the training form to float32
rounding (``tests/models/test_onnx.py`` holds them to 1e-4).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from models.mobile_frnet import HierarchicalInvertedResidual


def fold_batchnorm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (O, I/g, k, k) and bias (O,) of ``norm(conv(x))`` as one conv, in eval mode."""
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("a BatchNorm without running statistics cannot be folded")
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # (O,)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return (conv.weight * scale.reshape(-1, 1, 1, 1)).detach(), bias.detach()


class SummedProjection(nn.Module):
    """``BN(P [y_1; ...; y_s])`` computed as ``sum_i P'_i y_i + b'``, BN folded into P' and b'.

    ``project`` is the block's ``Sequential(Conv2d 1x1 without bias, BatchNorm2d)``; ``width``
    the channels of each y_i. Input: the s tensors (B, width, H, W); output (B, C_out, H, W).
    """

    def __init__(self, project: nn.Sequential, width: int) -> None:
        super().__init__()
        conv, norm = project
        if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
                and conv.kernel_size == (1, 1) and conv.groups == 1):
            raise TypeError(f"expected a 1x1 Conv2d and a BatchNorm2d, got {project}")
        if conv.in_channels % width:
            raise ValueError(f"{conv.in_channels} projected channels are not scales of {width}")
        weight, bias = fold_batchnorm(conv, norm)
        self.weights = nn.ParameterList(nn.Parameter(w.contiguous(), requires_grad=False)
                                        for w in torch.split(weight, width, dim=1))
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(parts) != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} scales, got {len(parts)}")
        out = F.conv2d(parts[0], self.weights[0], self.bias)
        for part, weight in zip(parts[1:], self.weights[1:], strict=True):
            out = out + F.conv2d(part, weight)
        return out


class HierarchicalInference(HierarchicalInvertedResidual):
    """A trained :class:`HierarchicalInvertedResidual` with its projection summed per scale.

    It takes over the block's trained modules under their own names (so the exported nodes keep
    the block's module paths) and replaces ``project`` by a :class:`SummedProjection`. Same
    input and output as the block: one tensor (B, C_in, H, W), or the ``scales`` parts of a
    split stem; output (B, C_out, H, W).
    """

    def __init__(self, block: HierarchicalInvertedResidual) -> None:
        nn.Module.__init__(self)  # the block's own constructor would build fresh modules
        self.scales, self.width, self.use_residual = block.scales, block.width, block.use_residual
        self.expand, self.convs, self.enhance = block.expand, block.convs, block.enhance
        self.projection = SummedProjection(block.project, block.width)

    def project_scales(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.projection(outputs)


def replace_modules(model: nn.Module, kinds: type[nn.Module] | tuple[type[nn.Module], ...],
                    replacement: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with every submodule of ``kinds`` swapped for
    ``replacement(submodule)``; ``model`` itself is left as it was."""
    copied = copy.deepcopy(model)
    for parent in list(copied.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kinds):
                setattr(parent, name, replacement(child))
    return copied


def inference_form(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every hierarchical block in its inference form.

    The copy shares no tensors with ``model``; a model without hierarchical blocks comes back
    as an unchanged copy. Its outputs equal ``model.eval()``'s up to float32 rounding.
    """
    form = replace_modules(model, HierarchicalInvertedResidual, HierarchicalInference)
    return form.eval().requires_grad_(False)
