"""APHQ-ViT's range searches for Linear and Conv2d layers (Wu et al., CVPR
2025; its public detection code, GoatWu/APHQ-ViT,
``Object-Detection/tools/quant_layers/{linear,conv}.py``): a grid of
``(scale, zero point)`` candidates between the 0.999-quantile range and the
full range, the candidate of least squared error on the quantized tensor
itself, per row (a weight's output channel; an activation tensor, or one
channel of a reparameterized post-LayerNorm input).

For a row ``x``, ``b`` bits, ``L = 2^b - 1``, ``E = 128`` candidates (the
code's ``eq_n``), quantiles as ``torch.quantile``::

    d_lo = Q(0.999) - Q(0.001),   d_hi = max(x) - min(x)
    Z zero points  z_j = 2^(b-1) - Z/2 + j,      j = 0 .. Z-1
    S = E // Z scales  s_i = (d_lo + u_i (d_hi - d_lo)) / L,
                       u = linspace(0, 1, S)   (activations: s_i >= 1e-4)
    candidates (s_i, z_j), j-major; the least sum of
    ((clamp(round(x / s) + z, 0, L) - z) s - x)^2 is kept (the first of
    equal errors).

``Z = min(16, 2^b)`` for Linear layers (``'aphq-grid'`` weights,
``'aphq-act-grid'`` inputs), ``Z = 2^(b-1)`` for Conv2d
(``'aphq-conv-grid'``, ``'aphq-conv-act-grid'``); the input of an MLP's
second Linear behind the ReLU of APHQ-ViT's MLP reconstruction
(``UniformQuantizer.input_follows_relu``) gets ``Z = 1``, ``z = 0`` and
``S = E`` scales. Every candidate keeps 0 exactly representable (``z`` in
``[0, L]``).

What differs from the public code: its activation quantiles of a tensor of
more than 16M values are the mean of the quantiles of its halves (quarters,
...), where ``torch.quantile`` gives up; here they are exact. A symmetric
quantizer (a deployment profile with zero point 0, e.g. TensorRT), which
the public code does not have, searches ``S = E`` scales between
``max(|Q(0.001)|, |Q(0.999)|)`` and ``max|x|`` over ``2^(b-1) - 1`` at the
zero point ``2^(b-1)`` (ours). Pure PyTorch.
"""
from typing import Callable

import torch

from ..registry import Registry
from .quantizers import (RANGE_SEARCHES, UniformQuantizer, _for_search,
                         broadcast_along, quantiles, uniform_fake_quant)

#: grid candidates per row (APHQ-ViT's ``eq_n``)
CANDIDATES = 128
#: the clip quantile of the smallest range of the grid
CLIP_QUANTILE = 0.999
#: the smallest activation scale of the grid (the public code's clamp)
MIN_ACT_SCALE = 1e-4


def linear_zero_points(bits: int) -> int:
    """``Z`` of a Linear layer's grid: ``min(16, 2^b)``."""
    return min(16, 2**bits)


def conv_zero_points(bits: int) -> int:
    """``Z`` of a Conv2d layer's grid: ``2^(b-1)``."""
    return 2**(bits - 1)


def grid_candidates(quantizer: UniformQuantizer, rows: torch.Tensor,
                    num_zero_points: int, min_scale: float = 0.0):
    """The ``(scale, zero)`` candidates of the module docstring for each row
    of ``rows`` (``[R, N]``), ``num_zero_points`` zero points (``Z``)."""
    bits = quantizer.bits
    lo_clip, hi_clip, lo, hi = quantiles(
        rows, [1 - CLIP_QUANTILE, CLIP_QUANTILE, 0.0, 1.0])
    if quantizer.symmetric:
        narrow = torch.maximum(lo_clip.abs(), hi_clip.abs())
        wide = torch.maximum(lo.abs(), hi.abs())
        steps = torch.linspace(0, 1, CANDIDATES, dtype=rows.dtype,
                               device=rows.device)
        return [quantizer.symmetric_params(-(narrow + u * (wide - narrow)),
                                           narrow + u * (wide - narrow))
                for u in steps]
    narrow, wide = hi_clip - lo_clip, hi - lo
    num_scales = CANDIDATES // num_zero_points
    first_zero = 2**(bits - 1) - num_zero_points // 2
    steps = torch.linspace(0, 1, num_scales, dtype=rows.dtype,
                           device=rows.device)
    scales = [((narrow + u * (wide - narrow)) / quantizer.levels)
              .clamp_min(max(min_scale, 1e-8)) for u in steps]
    return [(scale, torch.full_like(scale, first_zero + j))
            for j in range(num_zero_points) for scale in scales]


def grid_search(num_zero_points: Callable[[int], int],
                min_scale: float = 0.0):
    """A registered range search over the grid with ``num_zero_points(b)``
    zero points (a ReLU's output: one, at 0)."""

    def search(quantizer: UniformQuantizer, rows: torch.Tensor):
        if quantizer.input_follows_relu and not quantizer.symmetric:
            scales = grid_candidates(quantizer, rows, 1, min_scale)
            return [(scale, torch.zeros_like(scale))
                    for scale, _ in scales]
        return grid_candidates(quantizer, rows,
                               num_zero_points(quantizer.bits), min_scale)

    return search


RANGE_SEARCHES.register(grid_search(linear_zero_points), name='aphq-grid')
RANGE_SEARCHES.register(grid_search(linear_zero_points, MIN_ACT_SCALE),
                        name='aphq-act-grid')
RANGE_SEARCHES.register(grid_search(conv_zero_points),
                        name='aphq-conv-grid')
RANGE_SEARCHES.register(grid_search(conv_zero_points, MIN_ACT_SCALE),
                        name='aphq-conv-act-grid')


#: joint searches of an attention matmul's two operands by name
#: (``QuantMethod.matmul_search``): ``search(quantizer_a, quantizer_b, a,
#: b)`` sets the two per-head quantizers (``channel_axis=1``) of ``a @ b``
#: from the operands ``[N, H, ...]``
MATMUL_SEARCHES = Registry('matmul search')
#: the percentiles of APHQ-ViT's matmul candidates: ``l + (r - l) (i / (E -
#: 1))^0.1`` from ``l = 0.999`` to ``r = 0.99999``, ``i < E``, then 1
PRODUCT_PERCENTILES = tuple(
    0.999 + (0.99999 - 0.999) * (i / (CANDIDATES - 1))**0.1
    for i in range(CANDIDATES)) + (1.0, )
#: rounds of the alternating refinement (APHQ-ViT's ``search_round``)
PRODUCT_ROUNDS = 3


def head_bounds(x: torch.Tensor):
    """``(lowers, uppers)`` ``[P, H]``: per head (axis 1) of ``x``, the
    quantiles ``Q(1 - p)`` and ``Q(p)`` for ``p`` in
    :data:`PRODUCT_PERCENTILES`."""
    rows = _for_search(x.movedim(1, 0).reshape(x.shape[1], -1))
    ps = list(PRODUCT_PERCENTILES)
    bounds = quantiles(rows, [1 - p for p in ps] + ps)
    return bounds[:len(ps)], bounds[len(ps):]


def _grids(quantizer: UniformQuantizer, lowers: torch.Tensor,
           uppers: torch.Tensor):
    """APHQ-ViT's matmul grids of clip ranges ``[lo, hi]``: ``s = (hi -
    lo) / L``, ``z = -round(lo / s)`` (a symmetric quantizer: its symmetric
    grid of the range)."""
    if quantizer.symmetric:
        return quantizer.symmetric_params(lowers, uppers)
    scale = ((uppers - lowers) / quantizer.levels).clamp_min(1e-8)
    return scale, -torch.round(lowers / scale)


def _per_head(t: torch.Tensor, dims: int) -> torch.Tensor:
    """A per-head vector ``[H]`` shaped to broadcast over axis 1."""
    return broadcast_along(t, 1, dims)


def _best_candidate(x, scales, zeros, levels, output, target):
    """Per head, the index of the candidate ``(scales[p], zeros[p])``
    (``[P, H]``) whose fake-quantized ``x`` gives ``output(x^)`` closest to
    ``target`` in squared error, summed per head (the first of equal
    errors; in place: 2.3x faster than a float64 mean, measured)."""
    errors = torch.empty(scales.shape, dtype=target.dtype,
                         device=x.device)
    dims = [d for d in range(target.dim()) if d != 1]
    for p in range(scales.shape[0]):
        fake = uniform_fake_quant(x, _per_head(scales[p], x.dim()),
                                  _per_head(zeros[p], x.dim()), levels)
        errors[p] = output(fake).sub_(target).square_().sum(dims)
    return errors.argmin(0)


@MATMUL_SEARCHES.register(name='aphq-product')
def product_search(quantizer_a: UniformQuantizer,
                   quantizer_b: UniformQuantizer, a: torch.Tensor,
                   b: torch.Tensor) -> None:
    """APHQ-ViT's search of ``a @ b``'s operands, per head (its
    ``AsymmetricallyBatchingQuantMatMul.hyperparameter_searching``, metric
    ``mse``): candidates ``[Q(1 - p), Q(p)]`` per head for ``p`` in
    :data:`PRODUCT_PERCENTILES`; both start at ``p = 0.99999``; ``a``'s
    candidate of least mean squared error of the product against the float
    ``a @ b`` (``b`` quantized), then ``b``'s (``a`` quantized); then
    :data:`PRODUCT_ROUNDS` rounds in which each operand keeps its best
    upper bound and searches the lower one, then keeps that lower bound
    and searches the upper one."""
    target = a @ b
    state = {}
    for name, x, quantizer in (('a', a, quantizer_a), ('b', b, quantizer_b)):
        lowers, uppers = head_bounds(x)
        state[name] = dict(x=x, quantizer=quantizer, lowers=lowers,
                           uppers=uppers, up=uppers[-2], lo=lowers[-2])

    def fake(name):
        s = state[name]
        scale, zero = _grids(s['quantizer'], s['lo'], s['up'])
        return uniform_fake_quant(s['x'], _per_head(scale, s['x'].dim()),
                                  _per_head(zero, s['x'].dim()),
                                  s['quantizer'].levels)

    def search(name, lowers, uppers):
        s = state[name]
        scales, zeros = _grids(s['quantizer'], lowers, uppers)
        other = fake('b' if name == 'a' else 'a')
        best = _best_candidate(
            s['x'], scales, zeros, s['quantizer'].levels,
            (lambda q: q @ other) if name == 'a' else (lambda q: other @ q),
            target)
        heads = torch.arange(best.numel(), device=best.device)
        s['lo'] = lowers.expand_as(scales)[best, heads]
        s['up'] = uppers.expand_as(scales)[best, heads]

    for name in ('a', 'b'):
        search(name, state[name]['lowers'], state[name]['uppers'])
    for _ in range(PRODUCT_ROUNDS):
        for name in ('a', 'b'):
            s = state[name]
            search(name, s['lowers'], s['up'][None])
            search(name, s['lo'][None], s['uppers'])
    for name, quantizer in (('a', quantizer_a), ('b', quantizer_b)):
        quantizer.set_params(*_grids(quantizer, state[name]['lo'],
                                     state[name]['up']))
