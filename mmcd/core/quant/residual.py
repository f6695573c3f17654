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
``mmcd.models`` registers it for mmdet's class. Both factories return the
module unchanged for a method that does not quantize residual additions.
Pure PyTorch.
"""
import torch
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


class QuantSwinBlock(QuantizedModule, nn.Module):
    """Swin's block with its two residual additions as modules:
    ``x = x + attn(norm1(x))``, ``x = x + ffn_branch(norm2(x))`` (mmdet's
    ``SwinBlock.forward``; ``ffn_branch`` is mmcv's ``FFN`` without its
    addition: ``dropout_layer(gamma2(layers(.)))``). Shares the block's
    modules, so names and checkpoint keys are unchanged; in float it
    computes the block's function (tested)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        missing = [a for a in SWIN_BLOCK_ATTRS if not hasattr(block, a)] + [
            f'ffn.{a}' for a in FFN_ATTRS
            if not hasattr(getattr(block, 'ffn', None), a)]
        if missing:
            raise ValueError(f'{type(block).__name__} lacks {missing}; '
                             'not a Swin block')
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
