"""Fake quantizers for post-training quantization (simulated, as research PTQ
does: values are rounded to the integer grid and mapped back to floats).

Every quantizer is an ``nn.Module`` with three states:

* ``'fp'``: identity (the default, so a converted model is exactly the float
  model until it is calibrated);
* ``'calib'``: identity that records statistics of what passes through;
* ``'quant'``: fake quantization with the parameters fixed by
  :meth:`finalize` from the recorded statistics.

Quantizers:

* :class:`UniformQuantizer`: ``q = clamp(round(x / s) + z, 0, 2^b - 1)``,
  ``x^ = (q - z) s``; asymmetric, per tensor or per channel; range by
  min-max or, for activations, by the clipping search of RepQ-ViT (Li et
  al., ICCV 2023): the clip range at the quantiles ``p in {0.999, 0.9999,
  0.99999, 1}`` with the lowest MSE on the calibration data; weights search
  a clipping ratio per output channel by MSE.
* :class:`LogSqrt2Quantizer` (RepQ-ViT) for post-softmax attention in
  ``[0, 1]``: ``q = clamp(round(-2 log2 x), 0, 2^b - 1)``,
  ``x^ = 2^(-q / 2)``; values below the last level become 0.
* :class:`TanQuantizer`, our formulation of DopQ-ViT's TanQ (its equations
  are not public to us), also for post-softmax values: levels
  ``l_k = 1/2 + arctan(tau (2k/K - 1)) / (2 arctan tau)``, ``K = 2^b - 1``,
  which are dense near 0 *and* near 1 (where the few large attention weights
  that matter live) and sparse in between; encoding is the inverse, a
  tangent: ``k = round(K (1 + tan((2x - 1) arctan tau) / tau) / 2)``.
  ``tau`` is chosen per layer by calibration MSE from ``{1, 2, 4, 8, 16}``
  (``tau -> 0`` is the uniform grid).

The post-softmax quantizers pass gradients straight through their rounding
(identity backward), so QAT can keep them (qat.py). Pure PyTorch.
"""
import math
from typing import Optional

import torch
from torch import nn

STATES = ('fp', 'calib', 'quant')
#: Clip quantiles searched for activations (RepQ-ViT).
ACT_QUANTILES = (0.999, 0.9999, 0.99999, 1.0)
#: Calibration values kept per quantizer (a uniform random subsample) and per
#: observed batch (bounds memory: 32 batches -> 1M values, 4 MB).
MAX_SAMPLES = 1 << 18
MAX_BATCH_SAMPLES = 1 << 15


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f'bits must be an integer in 2..8, got {bits!r}')
    return bits


class FakeQuantizer(nn.Module):
    """State handling shared by the quantizers."""
    #: whether the quantizer has to run in every forward pass with gradients
    #: (QAT: qat_quantizers.py); PTQ weight quantizers are applied once
    trainable = False

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)
        self.state = 'fp'

    def set_state(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f'quantizer state must be one of {STATES}')
        if state == 'quant' and not self.calibrated:
            raise RuntimeError(f'{type(self).__name__} is not calibrated: '
                               'run calibration and finalize() first')
        self.state = state

    @property
    def calibrated(self) -> bool:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state == 'calib':
            self.observe(x.detach())
            return x
        if self.state == 'quant':
            return self.quantize(x)
        return x

    def extra_repr(self) -> str:
        return f'bits={self.bits}, state={self.state}'


def _subsample(x: torch.Tensor, limit: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    if flat.numel() <= limit:
        return flat
    return flat[torch.randint(flat.numel(), (limit, ), device=flat.device)]


class UniformQuantizer(FakeQuantizer):
    """Asymmetric uniform fake quantizer.

    Args:
        bits: 2..8.
        channel_axis: None for per tensor, else the axis with one scale per
            index (weights: 0, the output channels).
        search: ``'minmax'`` or ``'mse'`` (activations: quantile clipping;
            per-channel weights: clipping ratio per channel).
    """

    def __init__(self, bits: int, channel_axis: Optional[int] = None,
                 search: str = 'minmax'):
        super().__init__(bits)
        if search not in ('minmax', 'mse'):
            raise ValueError(f"search must be 'minmax' or 'mse', got {search}")
        self.channel_axis, self.search = channel_axis, search
        self.register_buffer('scale', torch.empty(0))
        self.register_buffer('zero_point', torch.empty(0))
        # per-channel offset added before and removed after quantization:
        # the zero-point half of RepQ-ViT's reparameterization (reparam.py)
        self.register_buffer('channel_offset', torch.empty(0))
        self._min = self._max = None
        self._samples = []

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def _shifted(self, x):
        return x + self.channel_offset if self.channel_offset.numel() else x

    def observe(self, x: torch.Tensor) -> None:
        x = self._shifted(x)
        if self.channel_axis is None:
            lo, hi = x.min(), x.max()
            if self.search == 'mse':
                self._samples.append(_subsample(x, MAX_BATCH_SAMPLES))
        else:
            dims = [d for d in range(x.dim())
                    if d != self.channel_axis % x.dim()]
            lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        self._min = lo if self._min is None else torch.minimum(self._min, lo)
        self._max = hi if self._max is None else torch.maximum(self._max, hi)

    def channel_ranges(self):
        """Observed (min, max), per channel if ``channel_axis`` is set."""
        if self._min is None:
            raise RuntimeError('no statistics recorded: calibrate first')
        return self._min, self._max

    def params_for_range(self, lo: torch.Tensor, hi: torch.Tensor):
        """Scale and zero point whose grid spans ``[min(lo, 0), max(hi, 0)]``
        (0 stays exactly representable)."""
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = ((hi - lo) / self.levels).clamp_min(1e-8)
        zero = torch.round(-lo / scale)
        return scale, zero

    def _fake(self, x, scale, zero):
        q = torch.clamp(torch.round(x / scale) + zero, 0, self.levels)
        return (q - zero) * scale

    def finalize(self, weight: Optional[torch.Tensor] = None) -> None:
        """Fix scale and zero point from the statistics (or from ``weight``
        for weight quantizers)."""
        if weight is not None:
            self._calibrate_weight(weight.detach())
        else:
            lo, hi = self.channel_ranges()
            scale, zero = self.params_for_range(lo, hi)
            if self.search == 'mse' and self.channel_axis is None:
                scale, zero = self._quantile_search(lo, hi)
            self._set(scale, zero)
        self._min = self._max = None
        self._samples = []

    def _set(self, scale, zero):
        self.scale = scale.detach().clone()
        self.zero_point = zero.detach().clone()

    def _quantile_search(self, lo, hi):
        data = _subsample(torch.cat(self._samples), MAX_SAMPLES)
        ordered = data.sort().values
        last = ordered.numel() - 1
        best = None
        for p in ACT_QUANTILES:  # lower quantile of the sorted sample
            clip_lo = ordered[int((1 - p) * last)] if p < 1 else lo
            clip_hi = ordered[int(p * last)] if p < 1 else hi
            scale, zero = self.params_for_range(clip_lo, clip_hi)
            err = (self._fake(data, scale, zero) - data).square().mean()
            if best is None or err < best[0]:
                best = (err, scale, zero)
        return best[1], best[2]

    def _calibrate_weight(self, w: torch.Tensor) -> None:
        axis = self.channel_axis
        dims = [d for d in range(w.dim()) if d != axis] if axis is not None \
            else list(range(w.dim()))
        lo, hi = w.amin(dim=dims), w.amax(dim=dims)
        if self.search == 'minmax':
            self._set(*self.params_for_range(lo, hi))
            return
        shape = [-1 if d == axis else 1 for d in range(w.dim())]
        best_err = best = None
        for ratio in torch.linspace(0.5, 1.0, 11).tolist():
            scale, zero = self.params_for_range(lo * ratio, hi * ratio)
            err = (self._fake(w, scale.view(shape), zero.view(shape)) -
                   w).square().mean(dim=dims)
            if best is None:
                best_err, best = err, (scale, zero)
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, scale, best[0]),
                    torch.where(better, zero, best[1]))
        self._set(*best)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self.scale, self.zero_point
        if self.channel_axis is not None:
            shape = [1] * x.dim()
            shape[self.channel_axis] = -1
            scale, zero = scale.view(shape), zero.view(shape)
        if self.channel_offset.numel():
            return self._fake(x + self.channel_offset, scale,
                              zero) - self.channel_offset
        return self._fake(x, scale, zero)


class LogSqrt2Quantizer(FakeQuantizer):
    """log-sqrt(2) quantizer for values in ``[0, 1]`` (post-softmax)."""

    def __init__(self, bits: int):
        super().__init__(bits)
        self.register_buffer('ready', torch.zeros((), dtype=torch.bool))

    @property
    def calibrated(self) -> bool:
        return bool(self.ready)

    def observe(self, x: torch.Tensor) -> None:
        pass  # the grid is fixed: levels 2^(-q/2) of the maximum 1

    def finalize(self) -> None:
        self.ready.fill_(True)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bits
        q = torch.round(-2 * torch.log2(x.clamp_min(1e-30)))
        out = torch.pow(2.0, -q.clamp_min(0) / 2)
        out = torch.where(q < levels, out, torch.zeros_like(out))
        return x + (out - x).detach()  # straight-through


class TanQuantizer(FakeQuantizer):
    """Tangent-encoded quantizer for values in ``[0, 1]`` (module
    docstring)."""

    TAUS = (1.0, 2.0, 4.0, 8.0, 16.0)

    def __init__(self, bits: int):
        super().__init__(bits)
        self.register_buffer('tau', torch.empty(0))
        self._samples = []

    @property
    def calibrated(self) -> bool:
        return self.tau.numel() > 0

    def observe(self, x: torch.Tensor) -> None:
        self._samples.append(_subsample(x, MAX_BATCH_SAMPLES))

    @staticmethod
    def _fake(x, tau, levels):
        atan = math.atan(tau)
        k = torch.round(levels * (1 + torch.tan(
            (2 * x.clamp(0, 1) - 1) * atan) / tau) / 2)
        return 0.5 + torch.atan(tau * (2 * k / levels - 1)) / (2 * atan)

    def finalize(self) -> None:
        if not self._samples:
            raise RuntimeError('no statistics recorded: calibrate first')
        data = _subsample(torch.cat(self._samples), MAX_SAMPLES)
        errs = [(self._fake(data, t, 2**self.bits - 1) - data).square().mean()
                for t in self.TAUS]
        self.tau = torch.tensor(self.TAUS[int(torch.stack(errs).argmin())])
        self._samples = []

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        out = self._fake(x, float(self.tau), 2**self.bits - 1)
        return x + (out - x).detach()  # straight-through
