"""Residual additions with their residual input quantized, where TensorRT
wants a QuantizeLinear/DequantizeLinear pair.

TensorRT's developer guide ("Q/DQ Layer-Placement Recommendations") asks
for Q/DQ on the *residual input* of a residual addition, the tensor carried
around the branch, so that the addition fuses into the weighted layer that
ends the branch (its output is not quantized: the guide also says not to
quantize the outputs of weighted layers). A method whose ``residual_adds``
is set (the ``tensorrt`` profile sets it, profiles.py) quantizes that input
per tensor with its activation quantizer; every other method leaves the
additions in float, as RepQ-ViT and the other papers do.

:class:`ResidualAdd` is ``residual + branch`` as a module, so that
conversion can take it over (as :class:`~.modules.MatMul` for matmuls):
mmcd's ViTDet block writes its additions with it. Swin's block adds inline:
:class:`QuantSwinBlock` takes it over, reading its attribute layout (mmdet's
``SwinBlock``: ``norm1``, ``attn``, ``norm2``, mmcv's ``FFN`` as ``ffn``
with ``layers``, ``gamma2``, ``dropout_layer``; ``with_cp``), and computes
the same function with its two additions as :class:`ResidualAdd`.
The FPN's top-down merges, ``lateral_conv(c_i) + upsample(p_{i+1})``, are the
guide's convolution-plus-addition case: the addition fuses into the lateral
convolution when its other input, the upsampled coarser level, carries Q/DQ.
:class:`QuantFPN` takes mmdet's ``FPN`` over (``lateral_convs``,
``fpn_convs``, ``upsample_cfg``, the extra-level options) and computes its
function with each merge as :class:`ResidualAdd`. ``mmcd.models`` registers
both for mmdet's classes. The factories return the module unchanged for a
method that does not quantize residual additions. Pure PyTorch.
"""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import checkpoint

from .methods import get_method
from .modules import QUANTIZED_MODULES, QuantizedModule
from .quantizers import FakeQuantizer


class ResidualAdd(nn.Module):
    """``residual + branch`` as a module (no parameters: checkpoint keys
    are unchanged by it)."""

    def forward(self, residual: torch.Tensor,
                branch: torch.Tensor) -> torch.Tensor:
        return residual + branch


class QuantResidualAdd(QuantizedModule, nn.Module):
    """``Q(residual) + branch``: the residual input fake-quantized per
    tensor (identity until calibrated), the branch as it is."""

    def __init__(self, quantizer: FakeQuantizer):
        super().__init__()
        self.residual_quantizer = quantizer

    @classmethod
    def from_float(cls, add: ResidualAdd, w_bits: int, a_bits: int,
                   method) -> nn.Module:
        """The twin factory: ``add`` itself unless the method quantizes
        residual additions."""
        method = get_method(method)
        if not method.residual_adds:
            return add
        return cls(method.act_quantizer(a_bits))

    def forward(self, residual: torch.Tensor,
                branch: torch.Tensor) -> torch.Tensor:
        return self.residual_quantizer(residual) + branch


QUANTIZED_MODULES.register(QuantResidualAdd.from_float, name=ResidualAdd)

SWIN_BLOCK_ATTRS = ('norm1', 'attn', 'norm2', 'ffn', 'with_cp')
FFN_ATTRS = ('layers', 'gamma2', 'dropout_layer')


def require_attributes(module: nn.Module, names: Sequence[str],
                       kind: str) -> None:
    """Raise naming the attributes of ``names`` that ``module`` lacks."""
    missing = [a for a in names if not hasattr(module, a)]
    if missing:
        raise ValueError(f'{type(module).__name__} lacks {missing}; '
                         f'not {kind}')


class QuantSwinBlock(QuantizedModule, nn.Module):
    """Swin's block with its two residual additions as modules:
    ``x = x + attn(norm1(x))``, ``x = x + ffn_branch(norm2(x))`` (mmdet's
    ``SwinBlock.forward``; ``ffn_branch`` is mmcv's ``FFN`` without its
    addition: ``dropout_layer(gamma2(layers(.)))``). Shares the block's
    modules, so names and checkpoint keys are unchanged; in float it
    computes the block's function (tested)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        require_attributes(block, SWIN_BLOCK_ATTRS, 'a Swin block')
        require_attributes(block.ffn, FFN_ATTRS, "a Swin block's FFN")
        if not getattr(block.ffn, 'add_identity', True):
            raise ValueError(f'{type(block).__name__}.ffn adds no residual '
                             '(add_identity=False); not a Swin block')
        self.norm1, self.attn = block.norm1, block.attn
        self.norm2, self.ffn = block.norm2, block.ffn
        self.with_cp = block.with_cp
        self.attn_residual = ResidualAdd()
        self.ffn_residual = ResidualAdd()

    @classmethod
    def from_float(cls, block: nn.Module, w_bits: int, a_bits: int,
                   method) -> nn.Module:
        """The twin factory: ``block`` itself unless the method quantizes
        residual additions (its additions are converted as children
        afterwards)."""
        return cls(block) if get_method(method).residual_adds else block

    def forward(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        def blocks(x):
            x = self.attn_residual(x, self.attn(self.norm1(x), hw_shape))
            ffn = self.ffn
            branch = ffn.dropout_layer(ffn.gamma2(ffn.layers(self.norm2(x))))
            return self.ffn_residual(x, branch)

        if self.with_cp and x.requires_grad:
            return checkpoint.checkpoint(blocks, x, use_reentrant=False)
        return blocks(x)


FPN_ATTRS = ('lateral_convs', 'fpn_convs', 'upsample_cfg', 'num_outs',
             'start_level', 'backbone_end_level', 'add_extra_convs',
             'relu_before_extra_convs')


class QuantFPN(QuantizedModule, nn.Module):
    """mmdet's ``FPN`` with its top-down merges as modules:
    ``l_i = lateral_i(c_i)``, then from the coarsest level down
    ``l_{i-1} = l_{i-1} + upsample(l_i)`` as ``ResidualAdd(residual=
    upsample(l_i), branch=l_{i-1})`` (the lateral convolution's output is
    the branch the addition fuses into), ``p_i = fpn_conv_i(l_i)``, and the
    extra levels by max pooling or by ``fpn_convs`` on the input, the last
    lateral or the last output (mmdet's ``FPN.forward``). Shares the neck's
    convolutions, so names and checkpoint keys are unchanged; in float it
    computes the neck's function (tested for each extra-level source)."""

    def __init__(self, fpn: nn.Module):
        super().__init__()
        require_attributes(fpn, FPN_ATTRS, 'an FPN')
        self.lateral_convs, self.fpn_convs = fpn.lateral_convs, fpn.fpn_convs
        for name in FPN_ATTRS[2:]:
            setattr(self, name, getattr(fpn, name))
        self.top_down_adds = nn.ModuleList(
            ResidualAdd() for _ in range(len(fpn.lateral_convs) - 1))

    @classmethod
    def from_float(cls, fpn: nn.Module, w_bits: int, a_bits: int,
                   method) -> nn.Module:
        """The twin factory: ``fpn`` itself unless the method quantizes
        residual additions."""
        return cls(fpn) if get_method(method).residual_adds else fpn

    def upsample(self, coarse: torch.Tensor,
                 fine: torch.Tensor) -> torch.Tensor:
        """``coarse`` resized to ``fine`` (by ``upsample_cfg``'s scale
        factor when it has one, as mmdet does)."""
        if 'scale_factor' in self.upsample_cfg:
            return F.interpolate(coarse, **self.upsample_cfg)
        return F.interpolate(coarse, size=fine.shape[2:], **self.upsample_cfg)

    def forward(self, inputs: Tuple[torch.Tensor]) -> tuple:
        laterals = [conv(inputs[i + self.start_level])
                    for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = self.top_down_adds[i - 1](
                self.upsample(laterals[i], laterals[i - 1]), laterals[i - 1])
        outs = [self.fpn_convs[i](lateral)
                for i, lateral in enumerate(laterals)]
        if self.num_outs == len(outs):
            return tuple(outs)
        if not self.add_extra_convs:  # extra levels by max pooling
            while len(outs) < self.num_outs:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            return tuple(outs)
        source = {'on_input': inputs[self.backbone_end_level - 1],
                  'on_lateral': laterals[-1],
                  'on_output': outs[-1]}[self.add_extra_convs]
        outs.append(self.fpn_convs[len(laterals)](source))
        for i in range(len(laterals) + 1, self.num_outs):
            previous = F.relu(outs[-1]) if self.relu_before_extra_convs \
                else outs[-1]
            outs.append(self.fpn_convs[i](previous))
        return tuple(outs)
