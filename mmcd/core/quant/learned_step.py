"""The learned activation step of block reconstruction: QDrop's
``LSQFakeQuantize`` (Wei et al., ICLR 2022; public code wimh966/QDrop,
``quantization/fake_quant.py``, on PyTorch's learnable fake quantization),
which APHQ-ViT's reconstruction keeps. The scale ``s`` is learned, the zero
point ``z`` stays where calibration put it::

    x^ = (clamp(round(x / s) + z, 0, L) - z) s,      L = 2^b - 1

with LSQ's straight-through gradients (Esser et al., ICLR 2020)::

    dx^/dx = 1 where 0 <= round(x / s) + z <= L, else 0
    dx^/ds = round(x / s) - x / s there; -z below; L - z above

``dx^/ds`` summed over the tensor (per channel: over each channel's values)
and multiplied by ``g = 1 / sqrt(N L)`` (``N`` the values per step). A
per-channel quantizer (the per-head grids of ``aphq-vit``'s attention
matmuls, whose scales APHQ-ViT's reconstruction learns too) learns one step
per channel. Before each use ``s`` is made ``|s|``, at least float32's
eps (QDrop). The zero point being fixed, an integer zero point stays one (a
symmetric grid stays symmetric), so a reconstructed model keeps the integer
grids a runtime needs. Pure PyTorch.
"""
import math

import torch
from torch import nn

from .quantizers import FakeQuantizer, UniformQuantizer, broadcast_along

#: the smallest learned step (QDrop: float32's eps)
MIN_STEP = torch.finfo(torch.float32).eps


class LearnedStepFunction(torch.autograd.Function):
    """``x^`` of the module docstring with its straight-through gradients
    for ``x`` and ``s`` (the zero point gets none)."""

    @staticmethod
    def forward(ctx, x, step, zero, levels: int, grad_factor: float):
        ratio = x / step
        codes = torch.round(ratio) + zero
        ctx.save_for_backward(ratio, zero)
        ctx.levels, ctx.grad_factor = levels, grad_factor
        ctx.step_shape = step.shape
        return (codes.clamp(0, levels) - zero) * step

    @staticmethod
    def backward(ctx, grad):
        ratio, zero = ctx.saved_tensors
        rounded = torch.round(ratio)
        codes = rounded + zero
        below, above = codes < 0, codes > ctx.levels
        inside = ~(below | above)
        d_step = torch.where(inside, rounded - ratio,
                             torch.where(below, -zero, ctx.levels - zero))
        grad_step = (grad * d_step).sum_to_size(ctx.step_shape) * \
            ctx.grad_factor
        return grad * inside, grad_step, None, None, None


class LearnedStepQuantizer(FakeQuantizer):
    """A calibrated activation :class:`UniformQuantizer` (per tensor, or per
    channel) whose steps are learned with its zero points (and its
    per-channel shift, if any) fixed (module docstring); :meth:`as_uniform`
    gives back the quantizer it computes."""
    trainable = True

    def __init__(self, calibrated: UniformQuantizer):
        if not calibrated.calibrated:
            raise ValueError(f'{calibrated.layer_name}: a learned step needs '
                             'a calibrated quantizer')
        super().__init__(calibrated.bits)
        self.like = [calibrated]  # a list: not a submodule
        self.layer_name = calibrated.layer_name
        self.levels, self.axis = calibrated.levels, calibrated.channel_axis
        self.step = nn.Parameter(calibrated.scale.detach().clone())
        self.register_buffer('zero_point',
                             calibrated.zero_point.detach().clone())
        self.register_buffer('channel_offset',
                             calibrated.channel_offset.detach().clone())
        self.state = 'quant'

    @property
    def calibrated(self) -> bool:
        return True

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.step.abs_().clamp_(min=MIN_STEP)
        offset = self.channel_offset
        shifted = x + offset if offset.numel() else x
        step, zero = self.step.to(x.dtype), self.zero_point.to(x.dtype)
        if self.axis is not None:
            step, zero = (broadcast_along(t, self.axis, x.dim())
                          for t in (step, zero))
        out = LearnedStepFunction.apply(
            shifted, step, zero, self.levels,
            1 / math.sqrt(x.numel() / self.step.numel() * self.levels))
        return out - offset if offset.numel() else out

    def as_uniform(self) -> UniformQuantizer:
        """The calibrated quantizer with the learned step as its scale."""
        like = self.like[0]
        out = UniformQuantizer(like.bits, like.channel_axis, like.search,
                               like.keep_zero, like.symmetric)
        out.layer_name = like.layer_name
        out.set_params(self.step.detach().clone(), self.zero_point,
                       self.channel_offset if self.channel_offset.numel()
                       else None)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + ', learned step'
