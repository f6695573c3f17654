"""Trainable fake quantizers for quantization-aware training (QAT), with
straight-through gradients. Pure PyTorch.

Rounding uses the straight-through estimator (STE, Bengio et al. 2013):
forward ``round(u)``, backward identity; clamping passes gradients inside
the range only. With ``u = x / s``:

* :class:`LsqActQuantizer`, activations, LSQ+ (Bhalgat et al., CVPRW 2020),
  the learnable-offset form of LSQ (Esser et al., ICLR 2020):
  ``x^ = clamp(round((x - beta) / s), 0, 2^b - 1) s + beta``, learnable
  ``s`` and ``beta``; ``dx^/dx = 1`` inside the range, else 0;
  ``dx^/ds = round(u') - u'`` inside (``u' = (x - beta) / s``), the clamp
  bound outside; ``dx^/dbeta = 0`` inside, 1 outside. ``s`` gets LSQ's
  gradient scale ``1 / sqrt(numel(x) Q_p)``. It *is* a
  :class:`~mmcd.core.quant.quantizers.UniformQuantizer` for calibration, so
  QAT starts from the PTQ calibration (``s``, ``beta = -z s``, and RepQ-ViT's
  per-channel shift), then learns.
* :class:`LsqWeightQuantizer`, weights, LSQ: symmetric signed grid
  ``q in [-2^(b-1), 2^(b-1) - 1]``, one learnable step per output channel,
  initialised as in LSQ to ``2 mean|W_row| / sqrt(Q_p)``.
* :class:`StatsWeightQuantizer`, weights, OFQ's StatsQ (Liu et al., ICML
  2023): the step is a statistic of the current weights, not a parameter
  (learnable steps make weights oscillate, OFQ's finding): clip range
  ``alpha = 2 mean|W_row|`` per output row, ``n = 2^(b-1)`` levels each side,
  step ``alpha / n``, levels at ``(k + 1/2) alpha / n`` for ``k in [-n, n-1]``:
  symmetric with no zero level. The step is not differentiated (a
  statistic; gradients reach ``W`` only through the STE), and the STE is the
  identity for every weight, also those beyond the clip range (LSQ zeroes
  those: 13% of the weights of a layer at 4 bits, 23% at 2 bits).

Both weight quantizers write ``w^ = (clamp(round(w / s - o), q_n, q_p) + o) s``
with offset ``o = 0`` (LSQ) or ``1/2`` (StatsQ); rounding boundaries are at
half-integers of ``w / s - o``. :meth:`TrainableWeightQuantizer.codes` gives
the integer level of every weight (oscillation statistics),
:meth:`~TrainableWeightQuantizer.boundary_distance` its distance, in steps,
to the nearest rounding boundary (OFQ's confidence, used by CGA).
"""
import math

import torch
from torch import nn

from ..registry import Registry
from .quantizers import FakeQuantizer, PostSoftmaxQuantizer, UniformQuantizer


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``factor`` backward."""
    return x * factor + (x - x * factor).detach()


class LsqPlusFunction(torch.autograd.Function):
    """LSQ+ fake quantization with its straight-through gradients written
    out (module docstring): one saved tensor pair instead of autograd's
    chain of elementwise nodes, which made QAT steps slower."""

    @staticmethod
    def forward(ctx, x, step, offset, levels: int, grad_factor: float):
        u = (x - offset) / step
        q = torch.round(u.clamp(0, levels))
        ctx.save_for_backward(u, q)
        ctx.levels, ctx.grad_factor = levels, grad_factor
        return q * step + offset

    @staticmethod
    def backward(ctx, grad):
        u, q = ctx.saved_tensors
        inside = (u >= 0) & (u <= ctx.levels)
        grad_x = grad * inside
        # d/ds: round(u) - u inside, the clamp bound (= q) outside
        grad_step = (grad * torch.where(inside, q - u, q)).sum() * \
            ctx.grad_factor
        grad_offset = (grad - grad_x).sum()
        return grad_x, grad_step, grad_offset, None, None


class LsqActQuantizer(UniformQuantizer):
    """Learnable per-tensor activation quantizer (LSQ+), calibrated like
    :class:`UniformQuantizer` (with its ``search``); ``set_params`` sets the
    step ``s`` and the offset ``-z s``."""
    trainable = True

    def __init__(self, bits: int, search: str = 'minmax'):
        super().__init__(bits, None, search)
        self.step = nn.Parameter(torch.ones(()))
        self.offset = nn.Parameter(torch.zeros(()))
        self.register_buffer('initialized', torch.zeros((), dtype=torch.bool))

    @classmethod
    def like(cls, quantizer: UniformQuantizer) -> 'LsqActQuantizer':
        """An uncalibrated LSQ+ quantizer with ``quantizer``'s bits and
        range search."""
        if quantizer.channel_axis is not None:
            raise ValueError('LsqActQuantizer is per tensor; got a '
                             'per-channel quantizer')
        return cls(quantizer.bits, quantizer.search)

    @property
    def calibrated(self) -> bool:
        return bool(self.initialized)

    def _set(self, scale, zero):
        with torch.no_grad():
            self.step.fill_(float(scale))
            self.offset.fill_(float(-zero * scale))
        self.initialized.fill_(True)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        out = LsqPlusFunction.apply(
            self._shifted(x), self.step.to(x.dtype), self.offset.to(x.dtype),
            self.levels, 1 / math.sqrt(x.numel() * self.levels))
        if self.channel_offset.numel():
            out = out - self.channel_offset
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + ', lsq+'


class TrainableWeightQuantizer(FakeQuantizer):
    """Symmetric signed per-output-channel weight quantizer (see module
    docstring); subclasses give the step."""
    trainable = True
    #: ``o``: 0 puts a level at 0, 1/2 leaves 0 out (StatsQ)
    level_offset = 0.0
    #: True: no gradient outside the clip range (LSQ); False: identity
    #: straight-through for every weight (OFQ's StatsQ)
    clip_gradient = True

    def __init__(self, bits: int):
        super().__init__(bits)
        self.qn, self.qp = -2**(bits - 1), 2**(bits - 1) - 1
        self.register_buffer('initialized', torch.zeros((), dtype=torch.bool))
        # confidence-guided annealing: frozen weights and their values
        self.register_buffer('frozen_mask', torch.empty(0, dtype=torch.bool))
        self.register_buffer('frozen_value', torch.empty(0))

    @property
    def calibrated(self) -> bool:
        return bool(self.initialized)

    def step_for(self, w: torch.Tensor) -> torch.Tensor:
        """The step, shaped to broadcast over ``w``."""
        raise NotImplementedError

    def _normalized(self, w):
        return w / self.step_for(w) - self.level_offset

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        step = self.step_for(w)
        u = w / step - self.level_offset
        if self.clip_gradient:
            level = round_ste(torch.clamp(u, self.qn, self.qp))
        else:  # forward clamp(round(u)), backward identity in u
            level = u + (torch.round(torch.clamp(u, self.qn, self.qp)) -
                         u).detach()
        return (level + self.level_offset) * step

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Integer level index of every weight."""
        return torch.clamp(torch.round(self._normalized(w)), self.qn,
                           self.qp).to(torch.int8)

    @torch.no_grad()
    def boundary_distance(self, w: torch.Tensor) -> torch.Tensor:
        """Distance of every latent weight to its nearest rounding boundary,
        in steps: ``1/2 - |u_c - round(u_c)| + |u - u_c|`` with ``u_c`` the
        normalized weight clamped to the grid (outside the grid the distance
        to the outermost boundary)."""
        u = self._normalized(w)
        clamped = torch.clamp(u, self.qn, self.qp)
        return 0.5 - (clamped - torch.round(clamped)).abs() + \
            (u - clamped).abs()

    def _rows(self, w):
        return [-1] + [1] * (w.dim() - 1)


class LsqWeightQuantizer(TrainableWeightQuantizer):
    """LSQ weight quantizer: a learnable step per output channel."""

    def __init__(self, bits: int, channels: int):
        super().__init__(bits)
        self.step = nn.Parameter(torch.ones(channels))

    def finalize(self, weight: torch.Tensor) -> None:
        """LSQ's initial step ``2 mean|W_row| / sqrt(Q_p)``."""
        w = weight.detach().reshape(weight.shape[0], -1)
        if w.shape[0] != self.step.numel():
            raise ValueError(f'weight has {w.shape[0]} output channels, the '
                             f'quantizer {self.step.numel()}')
        with torch.no_grad():
            self.step.copy_((2 * w.abs().mean(1) / math.sqrt(self.qp))
                            .clamp_min(1e-8))
        self.initialized.fill_(True)

    def step_for(self, w):
        per_step = w[0].numel()
        step = scale_grad(self.step, 1 / math.sqrt(per_step * self.qp))
        return step.view(self._rows(w))


class StatsWeightQuantizer(TrainableWeightQuantizer):
    """OFQ's StatsQ: step ``2 mean|W_row| / 2^(b-1)``, no zero level, and
    the identity straight-through gradient for every weight, clipped or
    not (as OFQ's code: the clamp is not differentiated)."""
    level_offset = 0.5
    clip_gradient = False

    def finalize(self, weight: torch.Tensor) -> None:
        self.initialized.fill_(True)  # the step is a statistic of W

    def step_for(self, w):
        alpha = 2 * w.detach().abs().reshape(w.shape[0], -1).mean(1)
        return (alpha / 2**(self.bits - 1)).clamp_min(1e-8).view(
            self._rows(w))


#: Trainable weight quantizers by name: ``factory(bits, out_channels)``.
QAT_WEIGHT_QUANTIZERS = Registry('QAT weight quantizer')
QAT_WEIGHT_QUANTIZERS.register(LsqWeightQuantizer, name='lsq')
QAT_WEIGHT_QUANTIZERS.register(
    lambda bits, channels: StatsWeightQuantizer(bits), name='statsq')

#: The QAT counterpart of each PTQ activation quantizer, by the PTQ
#: quantizer's class (found along its class hierarchy):
#: ``factory(ptq_quantizer) -> quantizer``. Uniform -> LSQ+; post-softmax
#: quantizers (fixed grids, straight-through gradients) stay.
QAT_ACT_QUANTIZERS = Registry('QAT activation quantizer')
QAT_ACT_QUANTIZERS.register(LsqActQuantizer.like, name=UniformQuantizer)
QAT_ACT_QUANTIZERS.register(lambda quantizer: quantizer,
                            name=PostSoftmaxQuantizer)
