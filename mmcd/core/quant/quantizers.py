"""Fake quantizers for post-training quantization (simulated, as research PTQ
does: values are rounded to the integer grid and mapped back to floats).

Every quantizer is an ``nn.Module`` with three states:

* ``'fp'``: identity (the default, so a converted model is exactly the float
  model until it is calibrated);
* ``'calib'``: the first tensor that passes through sets the parameters
  (:meth:`calibrate`), the quantizer switches to ``'quant'`` and quantizes
  that tensor already. As in RepQ-ViT's code, the calibration images go
  through the model once, as one batch, with quantization on: every layer
  is calibrated on the whole calibration set, with the inputs that the
  already-quantized layers before it produce (APHQ-ViT's calibration sets
  ``passes_float`` for its pass instead: the float model's inputs,
  convert.py). The search scores every
  candidate on every value of that tensor (no subsample), streamed in
  cache-sized chunks (:func:`squared_errors`); its quantiles come from an
  exact partial sort (:func:`extreme_values`);
* ``'quant'``: fake quantization with the fixed parameters.

Calibration refuses NaN/inf inputs (naming the layer); a constant input has
no range to search and gets the grid of ``[min(c, 0), max(c, 0)]``, where
``c`` is exact.

Quantizers and their sources (RepQ-ViT: Li et al., ICCV 2023, and its public
code; DopQ-ViT: Yang et al., 2024, whose equations are not public to us):

* :class:`UniformQuantizer`: ``q = clamp(round(x / s) + z, 0, 2^b - 1)``,
  ``x^ = (q - z) s``, asymmetric, per tensor or per channel; ``symmetric``:
  the zero point fixed at ``2^(b-1)`` and ``s = max(|lo|, |hi|) /
  (2^(b-1) - 1)`` for a range ``[lo, hi]``, which is the signed grid
  ``clamp(round(x / s), -2^(b-1), 2^(b-1) - 1) s`` of TensorRT's INT8
  (zero point 0) written on unsigned codes. Ranges:

  - ``'minmax'``: ``[min(x, 0), max(x, 0)]`` (0 exactly representable);
  - ``'quantile'`` (RepQ-ViT, activations and weights): the clip range
    ``[Q(1 - p), Q(p)]`` for ``p in {0.999, 0.9999, 0.99999}``, quantiles
    with linear interpolation as ``torch.quantile``, ``s = (hi - lo) /
    (2^b - 1)``, ``z = round(-lo / s)``; the ``p`` with the least mean
    squared error, per tensor or per channel;
  - ``'clip-ratio'`` (ours, weights): ``[r min, r max]`` per output channel
    for 11 ratios ``r in [0.5, 1]``, least MSE per channel. It measured
    slightly below the quantile search's error on weights; RepQ-ViT's
    ``'quantile'`` is the default of ``repq-vit`` and ``dopq-vit``
    (``weight_search='clip-ratio'`` selects ours);
  - APHQ-ViT's scale x zero-point grids (``'aphq-grid'`` and its
    activation and Conv2d variants): aphq_searches.py.

* :class:`LogSqrt2Quantizer` (RepQ-ViT) for post-softmax values:
  ``q = round(-2 log2(x / D))``, values with ``q >= 2^b`` become 0, the rest
  ``x^ = D 2^(-ceil(q/2)) (sqrt 2 if q odd else 1)`` (``= D 2^(-q/2)``);
  ``q`` is clamped at 0, so ``x > D`` gives ``D``. The scale ``D`` is the
  quantile ``Q(p)``, ``p in {0.999, 0.9999, 0.99999}``, of least MSE.
  Without ``D`` (the grid fixed at 1) a 4096-key attention row, whose weights
  sit near ``1/4096``, falls below the last level and quantizes to zero.
* :class:`TanQuantizer`, our formulation of DopQ-ViT's TanQ on ``[0, D]``:
  levels ``D l_k``, ``l_k = 1/2 + arctan(tau (2k/K - 1)) / (2 arctan tau)``,
  ``K = 2^b - 1``, dense near 0 and near ``D`` and sparse between; encoding
  by the inverse, ``k = round(K (1 + tan((2 x/D - 1) arctan tau) / tau) /
  2)``. ``(D, tau)`` jointly by least MSE over the three quantiles above and
  ``tau in {1, 2, 4, 8, 16}``.

The post-softmax quantizers pass gradients straight through their rounding
(identity backward), so QAT can keep them (qat.py). Pure PyTorch.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..registry import Registry

STATES = ('fp', 'calib', 'quant')
#: Clip quantiles searched by RepQ-ViT (activations, weights, log-sqrt2).
RANGE_QUANTILES = (0.999, 0.9999, 0.99999)
#: Clipping ratios of the ``'clip-ratio'`` weight search (ours).
CLIP_RATIOS = tuple(torch.linspace(0.5, 1.0, 11).tolist())
#: Range searches of :class:`UniformQuantizer` by name:
#: ``search(quantizer, rows) -> [(scale, zero), ...]``, candidate grids per
#: row of ``rows [channels, values]``; the one of least squared error is
#: kept (a single candidate is kept without scoring).
RANGE_SEARCHES = Registry('range search')


def broadcast_along(t: torch.Tensor, axis: int, dims: int) -> torch.Tensor:
    """A per-channel vector ``t`` viewed to broadcast along ``axis`` of a
    ``dims``-dimensional tensor."""
    shape = [1] * dims
    shape[axis] = -1
    return t.view(shape)


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f'bits must be an integer in 2..8, got {bits!r}')
    return bits


def quantiles(rows: torch.Tensor, ps: Sequence[float]) -> torch.Tensor:
    """Quantiles of each row of ``rows`` (``[R, N]``), as ``torch.quantile``
    computes them (linear interpolation at position ``p (N - 1)``), for
    tail probabilities ``ps`` (each ``>= 0.99`` or ``<= 0.01``). Returns
    ``[len(ps), R]``.

    ``torch.quantile`` sorts and refuses inputs over 16M values; only the
    tails are needed here, so the sorted largest or smallest ``1%`` do
    (:func:`extreme_values`, both tails in one sweep), on tensors of any
    size.
    """
    n = rows.shape[-1]
    if any(0.01 < p < 0.99 for p in ps):
        raise ValueError(f'tail quantiles only, got {list(ps)}')
    positions = [p * (n - 1) for p in ps]
    floors = [math.floor(pos) for pos in positions]
    # one partial sort per tail, deep enough for its deepest quantile
    k_top = max([n - f for p, f in zip(ps, floors) if p >= 0.99],
                default=0)
    k_bottom = max([min(f + 1, n - 1) + 1 for p, f in zip(ps, floors)
                    if p <= 0.01], default=0)
    top, bottom = extreme_values(rows, k_top, k_bottom)
    out = []
    for p, pos, lo in zip(ps, positions, floors):
        hi = min(lo + 1, n - 1)
        if p >= 0.99:  # ascending index i = descending index n - 1 - i
            v_lo, v_hi = top[:, n - 1 - lo], top[:, n - 1 - hi]
        else:
            v_lo, v_hi = bottom[:, lo], bottom[:, hi]
        out.append(v_lo + (v_hi - v_lo) * (pos - lo))
    return torch.stack(out)


#: rows longer than this are partially sorted through a pre-filter
#: (:func:`extreme_values`); shorter ones by one batched ``topk``
_PREFILTER_MIN_LENGTH = 1 << 16
#: values per row that :func:`extreme_values` guesses its thresholds from
_SUBSAMPLE = 16384
#: values per block of :func:`extreme_values`' selection
_BLOCK = 32


def subsample_columns(length: int, device=None) -> torch.Tensor:
    """The column indices of :func:`extreme_values`' subsample of a row of
    ``length`` values: :data:`_SUBSAMPLE` drawn uniformly with replacement
    from a fixed seed (the same for every call: calibration stays
    deterministic, and the result is exact whatever the draw)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(length, (_SUBSAMPLE, ),
                         generator=generator).sort().values.to(device)


def extreme_values(
        rows: torch.Tensor, k_top: int, k_bottom: int
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The ``k_top`` largest values of each row of ``rows`` (``[R, N]``),
    from the largest down, and its ``k_bottom`` smallest, from the smallest
    up, exactly as ``rows.topk(k, largest=..., sorted=True)``; None for a
    ``k`` of 0.

    ``topk`` over a long row costs about as much as a full sort of it, so
    long rows are first cut down (written for the largest; the smallest
    mirror it): the value ``t`` ranked ``2k N'/N + 16`` in a subsample of
    ``N' = 16384`` values of a row (:func:`subsample_columns`; a strided
    one would see a single channel of a flattened ``[..., C]`` activation
    whenever ``C`` divides the stride, and miss: measured 1.9 s instead of
    0.08 s on Swin-T's largest FFN input) is a guess for a threshold below
    its ``k``-th largest value. The values ``> t`` are found block by block
    (:data:`_BLOCK` values): the blocks' maxima (one reduction over the
    tensor), then the comparison only in the blocks whose maximum is
    ``> t`` (about 10% of them): a comparison and a selection over a
    whole float tensor are slow in PyTorch, even in cache (both tails of a
    37.7M-value tensor: 131 ms by comparisons over the tensor, 60 ms by
    blocks). If at least ``k`` values of a row are ``> t``,
    they hold its top ``k`` (one ``topk`` of the survivors of all rows);
    if fewer, but enough values equal ``t`` to make up ``k`` (ties, e.g. a
    ReLU's zeros), the top ``k`` are those ``> t`` followed by copies of
    ``t``; both exact. Otherwise (``t`` was guessed too extreme) that row's
    full ``topk`` runs.
    """
    num_rows, length = rows.shape
    tails = [(k, largest) for k, largest in ((k_top, True),
                                             (k_bottom, False)) if k]
    if length <= _PREFILTER_MIN_LENGTH:
        found = {largest: rows.topk(k, dim=1, largest=largest,
                                    sorted=True).values
                 for k, largest in tails}
        return found.get(True), found.get(False)
    sample = rows.index_select(1, subsample_columns(length, rows.device))
    per_row = length // _BLOCK
    # [R * per_row, _BLOCK]: a view of the row-major rows
    blocks = rows[:, :per_row * _BLOCK].reshape(-1, _BLOCK)
    rest = rows[:, per_row * _BLOCK:]
    found = {}
    for k, largest in tails:
        rank = min(sample.shape[1], 2 * k * sample.shape[1] // length + 16)
        threshold = sample.topk(rank, dim=1, largest=largest).values[:, -1:]
        beyond = torch.gt if largest else torch.lt
        extreme = blocks.amax(1) if largest else blocks.amin(1)
        hit_blocks = beyond(extreme.view(num_rows, per_row),
                            threshold).view(-1).nonzero()[:, 0]
        hit = blocks.index_select(0, hit_blocks)  # [hits, _BLOCK]
        hit_rows = hit_blocks // per_row
        kept = beyond(hit, threshold.index_select(0, hit_rows)).view(
            -1).nonzero()[:, 0]
        rest_rows, rest_columns = beyond(rest, threshold).nonzero(
            as_tuple=True)
        found[largest] = _extremes_of_survivors(
            rows, k, largest, threshold,
            torch.cat([hit_rows.index_select(0, kept // _BLOCK), rest_rows]),
            torch.cat([hit.view(-1).index_select(0, kept),
                       rest[rest_rows, rest_columns]]))
    return found.get(True), found.get(False)


def _extremes_of_survivors(rows, k, largest, thresholds, row_of,
                           survivors):
    """:func:`extreme_values` of one tail from the values ``survivors``
    (in rows ``row_of``) beyond the rows' ``thresholds``."""
    num_rows = rows.shape[0]
    if num_rows > 1:  # row by row (the blocks', then the rest's)
        order = row_of.argsort(stable=True)
        row_of, survivors = row_of[order], survivors[order]
    counts = torch.bincount(row_of, minlength=num_rows)
    # the survivors of every row, padded to the longest with -inf (+inf)
    padded = torch.full((num_rows, int(counts.max())),
                        -math.inf if largest else math.inf,
                        dtype=rows.dtype, device=rows.device)
    padded[torch.arange(padded.shape[1], device=rows.device) <
           counts[:, None]] = survivors
    out = padded.topk(min(k, padded.shape[1]), dim=1, largest=largest,
                      sorted=True).values
    if bool((counts >= k).all()):
        return out
    short = [int(i) for i in (counts < k).nonzero()[:, 0]]
    out = torch.cat([out, out.new_empty(num_rows, k - out.shape[1])], 1)
    for i in short:
        row, count, threshold = rows[i], int(counts[i]), thresholds[i]
        if int(torch.count_nonzero(row == threshold)) >= k - count:
            # ties at the threshold fill the rest exactly
            out[i, :count] = padded[i, :count].sort(
                descending=largest).values
            out[i, count:] = threshold
        else:
            out[i] = row.topk(k, largest=largest, sorted=True).values
    return out


class FakeQuantizer(nn.Module):
    """State handling shared by the quantizers (module docstring)."""
    #: whether the quantizer has to run in every forward pass with gradients
    #: (QAT: qat_quantizers.py); PTQ weight quantizers are applied once
    trainable = False

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)
        self.state = 'fp'
        #: pass inputs through unquantized whatever the state (a calibration
        #: on the float model's inputs sets it for its pass: convert.py)
        self.passes_float = False
        #: the module path, for messages (set by ``quantize_model``)
        self.layer_name = type(self).__name__
        #: set during calibration passes (convert.py): ``calls`` counts the
        #: calls (a module shared by several inputs, e.g. an RPN head over
        #: the FPN levels, is called once per input), ``gathered`` keeps
        #: every input for :meth:`calibrate_all`
        self.calls: Optional[int] = None
        self.gathered: Optional[List[torch.Tensor]] = None

    def set_state(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f'quantizer state must be one of {STATES}')
        if state == 'quant' and not self.calibrated:
            raise RuntimeError(f'{self.layer_name} is not calibrated: run '
                               'calibration first')
        self.state = state

    @property
    def calibrated(self) -> bool:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calls is not None:
            self.calls += 1
        if self.gathered is not None:
            self.gathered.append(self._checked(x))
        if self.state == 'calib':
            self.calibrate(self._checked(x))
            self.state = 'quant'
        if self.state == 'quant' and not self.passes_float:
            return self.quantize(x)
        return x

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` detached, refused when empty or not finite."""
        data = x.detach()
        if data.numel() == 0:
            raise ValueError(
                f'calibration input of {self.layer_name} is empty (no '
                'detections reached it?): calibrate on more images')
        # min and max propagate NaN: one cheap reduction checks all
        if not torch.isfinite(torch.stack(torch.aminmax(data))).all():
            raise ValueError(f'calibration input of {self.layer_name} '
                             'has NaN or inf values')
        return data

    def calibrate(self, x: torch.Tensor) -> None:
        """Set the parameters from the calibration tensor ``x``."""
        raise NotImplementedError

    def calibrate_all(self, tensors: Sequence[torch.Tensor]) -> None:
        """Set the parameters from the inputs of every call of a module
        called several times per pass (convert.py)."""
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f'bits={self.bits}, state={self.state}'

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Buffers and parameters whose shape is only known after
        calibration (empty until then) load at the shape stored in the
        checkpoint, so a converted model loads a calibrated checkpoint
        before it was ever calibrated (QAT ``--resume``, ``tools/test.py``
        of a QAT checkpoint)."""
        for name, tensor in list(self._buffers.items()) + list(
                self._parameters.items()):
            stored = state_dict.get(prefix + name)
            if tensor is not None and stored is not None and \
                    tensor.shape != stored.shape and tensor.numel() == 0:
                tensor.data = torch.empty_like(stored, device=tensor.device,
                                               dtype=tensor.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _for_search(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision the range searches use: float32 at least."""
    return x if x.dtype == torch.float64 else x.float()


#: values per chunk of the MSE search and of fake quantization without
#: gradients: a chunk and its temporaries stay in cache, so a quantizer's
#: chain of elementwise ops costs one pass over memory instead of one per op
_CHUNK = 1 << 18


def map_in_chunks(fn, x: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """``fn(x, None)`` for an elementwise ``fn(src, out)`` whose parameters
    broadcast along the last dimension and whose result has ``dtype``,
    computed over chunks of rows of ``x`` viewed as ``[-1, x.shape[-1]]``
    (:data:`_CHUNK`), each written by ``fn`` into its slice ``out`` of the
    result. Runs ``fn(x, None)`` at once when autograd needs the graph."""
    if x.dim() == 0 or x.numel() <= _CHUNK or (
            torch.is_grad_enabled() and x.requires_grad):
        return fn(x, None)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows, dtype=dtype)
    step = max(1, _CHUNK // rows.shape[1])
    for src, dst in zip(rows.split(step), out.split(step)):
        fn(src, dst)
    return out.view(x.shape)


def calls_errors(calls: Sequence[torch.Tensor], candidates: Sequence[tuple],
                 fake) -> torch.Tensor:
    """:func:`squared_errors` of the rows of one call; of several calls
    (a module called more than once per pass: an RPN head on every FPN
    level) each call's mean squared error per row, summed over the calls,
    so that every call weighs the same whatever its size, as APHQ-ViT's
    convolution search sums each call's mean error."""
    if len(calls) == 1:
        return squared_errors(calls[0], candidates, fake)
    return sum(squared_errors(rows, candidates, fake) / rows.shape[1]
               for rows in calls)


def squared_errors(rows: torch.Tensor, candidates: Sequence[tuple],
                   fake) -> torch.Tensor:
    """Sum of squared errors ``sum_j (fake(x_j, *params) - x_j)^2`` of
    every candidate ``params`` over every value of each row of ``rows``
    (``[R, N]``): ``[len(candidates), R]``, accumulated in float64.
    ``fake(x, *params, out=...)`` writes its result into ``out``.

    Exact (every value is scored); the columns go in chunks of about
    ``2^18`` values so that the quantizer's elementwise ops run in cache
    (17x faster than whole-tensor ops on an 80M-value activation, measured
    on 2 CPU cores).
    """
    errors = torch.zeros(len(candidates), rows.shape[0],
                         dtype=torch.float64, device=rows.device)
    columns = max(1, _CHUNK // rows.shape[0])
    buffer = None  # one chunk-sized temporary for all candidates and chunks
    for part in rows.split(columns, dim=1):
        if buffer is None or buffer.shape != part.shape:
            buffer = torch.empty(part.shape, dtype=part.dtype,
                                 device=part.device)
        for i, params in enumerate(candidates):
            diff = fake(part, *params, out=buffer).sub_(part)
            if diff.shape[0] == 1:  # one row: dot is 1.7x faster (measured)
                errors[i] += torch.dot(diff[0], diff[0])
            else:
                errors[i] += torch.linalg.vecdot(diff, diff)
    return errors


def uniform_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  lo: int, hi: int,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The integer codes ``clamp(round(x / s) + z, lo, hi)`` as floats
    (round half to even, as ONNX's QuantizeLinear), in place on one tensor
    (``out`` if given; 2.6x faster than a new tensor per op, measured)."""
    return torch.div(x, scale, out=out).round_().add_(zero).clamp_(lo, hi)


def uniform_fake_quant(x: torch.Tensor, scale: torch.Tensor,
                       zero: torch.Tensor, levels: int,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(clamp(round(x / s) + z, 0, levels) - z) s``: :func:`uniform_codes`
    mapped back to floats, in place."""
    return uniform_codes(x, scale, zero, 0, levels, out).sub_(zero).mul_(scale)


class UniformQuantizer(FakeQuantizer):
    """Uniform fake quantizer, asymmetric or symmetric.

    Args:
        bits: 2..8.
        channel_axis: None for per tensor, else the axis with one scale per
            index (weights: 0, the output channels; post-LayerNorm
            activations during RepQ-ViT's calibration: -1).
        search: a registered range search (:data:`RANGE_SEARCHES`):
            ``'minmax'``, ``'quantile'`` or ``'clip-ratio'`` (weights), see
            the module docstring.
        keep_zero: extend every searched clip range to include 0, so that
            0 is exactly representable (the per-channel grids of
            reparameterized post-LayerNorm activations: Swin zero-pads them,
            and the padding must stay 0; reparam.py).
        symmetric: every grid symmetric around 0 with the zero point
            ``2^(b-1)`` (module docstring): the signed integers of a
            runtime that takes zero point 0 only (TensorRT).
    """

    def __init__(self, bits: int, channel_axis: Optional[int] = None,
                 search: str = 'minmax', keep_zero: bool = False,
                 symmetric: bool = False):
        super().__init__(bits)
        self.keep_zero, self.symmetric = keep_zero, symmetric
        #: the input is a ReLU's output (set by APHQ-ViT's MLP
        #: reconstruction; its range search fixes the zero point at 0)
        self.input_follows_relu = False
        RANGE_SEARCHES.get(search)  # registered?
        self.channel_axis, self.search = channel_axis, search
        self.register_buffer('scale', torch.empty(0))
        self.register_buffer('zero_point', torch.empty(0))
        # per-channel offset added before and removed after quantization:
        # the shift half of RepQ-ViT's reparameterization (reparam.py)
        self.register_buffer('channel_offset', torch.empty(0))

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def _shifted(self, x):
        return x + self.channel_offset if self.channel_offset.numel() else x

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[channels, values]`` (one row per tensor), searched in
        float32 at least. Per-channel rows are copied to be contiguous: the
        search's passes over them cost less than over a strided view by
        more than the copy (measured on a post-LayerNorm ``[B, H, W, 96]``
        activation: 203 -> 158 ms per search)."""
        x = _for_search(x)
        if self.channel_axis is None:
            return x.reshape(1, -1)
        return x.movedim(self.channel_axis, 0).reshape(
            x.shape[self.channel_axis], -1).contiguous()

    @property
    def signed_zero(self) -> int:
        """The zero point of a symmetric grid, ``2^(b-1)``: code
        ``2^(b-1) + k`` is the signed integer ``k``."""
        return 2**(self.bits - 1)

    def symmetric_params(self, lo: torch.Tensor, hi: torch.Tensor):
        """The symmetric grid covering ``[lo, hi]``: ``s = max(|lo|, |hi|)
        / (2^(b-1) - 1)``, ``z = 2^(b-1)``."""
        bound = torch.maximum(lo.abs(), hi.abs())
        scale = (bound / (self.signed_zero - 1)).clamp_min(1e-8)
        return scale, torch.full_like(scale, self.signed_zero)

    def params_for_range(self, lo: torch.Tensor, hi: torch.Tensor):
        """Scale and zero point whose grid spans ``[min(lo, 0), max(hi, 0)]``
        (0 stays exactly representable): the min-max grid."""
        if self.symmetric:
            return self.symmetric_params(lo, hi)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = ((hi - lo) / self.levels).clamp_min(1e-8)
        zero = torch.round(-lo / scale)
        return scale, zero

    def clip_params(self, lo: torch.Tensor, hi: torch.Tensor):
        """RepQ-ViT's grid of a clip range: ``s = (hi - lo) / (2^b - 1)``,
        ``z = round(-lo / s)``; a range of width 0 (a constant) falls back
        to the min-max grid, where the constant is exact."""
        if self.symmetric:
            return self.symmetric_params(lo, hi)
        if self.keep_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        width = hi - lo
        flat = width <= 1e-8 * hi.abs().clamp_min(1.0)
        scale = torch.where(flat, torch.ones_like(width), width / self.levels)
        zero = torch.round(-lo / scale)
        if flat.any():
            mm_scale, mm_zero = self.params_for_range(lo, hi)
            scale = torch.where(flat, mm_scale, scale)
            zero = torch.where(flat, mm_zero, zero)
        return scale, zero

    def _fake(self, x, scale, zero, out=None):
        return uniform_fake_quant(x, scale, zero, self.levels, out)

    def _search(self, calls: Sequence[torch.Tensor]):
        """Per-row (scale, zero) of least error (:func:`calls_errors`)
        among the candidates of ``self.search`` on the rows of all
        ``calls`` together."""
        candidates = RANGE_SEARCHES.get(self.search)(
            self, calls[0] if len(calls) == 1 else torch.cat(calls, 1))
        if len(candidates) == 1:
            return candidates[0]
        errors = calls_errors(
            calls, [(scale[:, None], zero[:, None])
                    for scale, zero in candidates], self._fake)
        best = errors.argmin(0, keepdim=True)  # the first of equal errors
        return tuple(
            torch.stack(params).gather(0, best)[0]
            for params in zip(*candidates))

    def calibrate(self, x: torch.Tensor) -> None:
        self.calibrate_all([x])

    def calibrate_all(self, tensors: Sequence[torch.Tensor]) -> None:
        """Candidates from each channel's values of all ``tensors`` (they
        may differ in every dimension but the channel's), scored with every
        tensor weighing the same (:func:`calls_errors`)."""
        scale, zero = self._search(
            [self._rows(self._shifted(t)) for t in tensors])
        if self.channel_axis is None:
            scale, zero = scale[0], zero[0]
        self._set(scale, zero)

    def finalize(self, weight: torch.Tensor) -> None:
        """Weight quantizers: the parameters from the weight itself."""
        self.calibrate(weight.detach())

    def _set(self, scale, zero):
        self.scale = scale.detach().clone()
        self.zero_point = zero.detach().clone()

    def set_params(self, scale: torch.Tensor, zero: torch.Tensor,
                   channel_offset: Optional[torch.Tensor] = None) -> None:
        """Fix the parameters from outside (RepQ-ViT's reparameterization
        keeps its target grid) and switch quantization on."""
        self._set(scale, zero)
        if channel_offset is not None:
            self.channel_offset = channel_offset.detach().clone()
        self.state = 'quant'

    def channel_params(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Calibrated per-channel (scale, zero point)."""
        if not self.calibrated:
            raise RuntimeError(f'{self.layer_name} is not calibrated')
        return self.scale, self.zero_point

    def params_along(self, x: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, zero point) shaped to broadcast over ``x``
        along ``channel_axis``."""
        return tuple(broadcast_along(t, self.channel_axis, x.dim())
                     for t in (self.scale, self.zero_point))

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer codes ``clamp(round(w / s) + z, 0, 2^b - 1)`` of a
        per-channel weight (what an export stores; AdaRound overrides
        the rounding)."""
        scale, zero = self.params_along(w)
        return uniform_codes(w.to(scale.dtype), scale, zero, 0, self.levels)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self.scale, self.zero_point
        offset = self.channel_offset  # [C] on the last axis, or empty
        if self.channel_axis is not None and \
                self.channel_axis % x.dim() != x.dim() - 1:
            scale, zero = self.params_along(x)
            return self._fake_shifted(x, scale, zero, offset)
        return map_in_chunks(
            lambda part, out: self._fake_shifted(part, scale, zero, offset,
                                                 out), x,
            torch.result_type(x, scale))  # half inputs: float32 grid math

    def extra_repr(self) -> str:
        return super().extra_repr() + (', symmetric' if self.symmetric
                                       else '')

    def _fake_shifted(self, x, scale, zero, offset, out=None):
        if offset.numel():
            return self._fake(x + offset, scale, zero, out).sub_(offset)
        return self._fake(x, scale, zero, out)


@RANGE_SEARCHES.register(name='minmax')
def minmax_search(quantizer: UniformQuantizer, rows: torch.Tensor):
    """``[min(x, 0), max(x, 0)]`` per row."""
    return [quantizer.params_for_range(rows.amin(1), rows.amax(1))]


@RANGE_SEARCHES.register(name='quantile')
def quantile_search(quantizer: UniformQuantizer, rows: torch.Tensor):
    """RepQ-ViT's clip ranges ``[Q(1 - p), Q(p)]``, ``p`` in
    :data:`RANGE_QUANTILES`."""
    ps = RANGE_QUANTILES
    bounds = quantiles(rows, [1 - p for p in ps] + list(ps))
    return [quantizer.clip_params(bounds[i], bounds[len(ps) + i])
            for i in range(len(ps))]


@RANGE_SEARCHES.register(name='clip-ratio')
def clip_ratio_search(quantizer: UniformQuantizer, rows: torch.Tensor):
    """Ours: ``[r min, r max]`` for ``r`` in :data:`CLIP_RATIOS`."""
    lo, hi = rows.amin(1), rows.amax(1)
    return [quantizer.params_for_range(lo * r, hi * r) for r in CLIP_RATIOS]


class PostSoftmaxQuantizer(FakeQuantizer):
    """A quantizer of values in ``[0, D]`` with a calibrated scale ``D``
    (a buffer) and straight-through gradients."""

    def __init__(self, bits: int):
        super().__init__(bits)
        self.register_buffer('delta', torch.empty(0))

    @property
    def calibrated(self) -> bool:
        return self.delta.numel() > 0

    @staticmethod
    def _delta_candidates(x: torch.Tensor) -> torch.Tensor:
        """The quantiles ``p in {0.999, 0.9999, 0.99999}`` of ``x``; a
        tensor whose quantiles are all 0 (a mask of zeros) gets its
        maximum, or 1."""
        deltas = quantiles(x.reshape(1, -1), RANGE_QUANTILES)[:, 0]
        if not (deltas > 0).any():
            peak = float(x.max())
            deltas = torch.full_like(deltas, peak if peak > 0 else 1.0)
        return deltas.clamp_min(1e-30)

    def fake_quantize(self, x: torch.Tensor,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The calibrated formula applied to all of ``x`` at once (into
        ``out`` if given), without straight-through gradients."""
        return self._fake(x, self.delta.to(x.dtype), *self._extra_params(),
                          out=out)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        out = map_in_chunks(self.fake_quantize, x.detach(), x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return x + (out - x).detach()  # straight-through
        return out

    def _extra_params(self):
        return ()

    def calibrate(self, x: torch.Tensor) -> None:
        """The candidate parameters (:meth:`_candidates`) of least MSE."""
        self.calibrate_all([x])

    def calibrate_all(self, tensors: Sequence[torch.Tensor]) -> None:
        """Candidates from the values of all ``tensors``, scored with
        every tensor weighing the same (:func:`calls_errors`)."""
        calls = [_for_search(t).reshape(1, -1) for t in tensors]
        candidates = list(self._candidates(self._delta_candidates(
            calls[0] if len(calls) == 1 else torch.cat(calls, 1))))
        errors = calls_errors(calls, candidates, self._fake)
        self._set_params(*candidates[int(errors[:, 0].argmin())])


class LogSqrt2Quantizer(PostSoftmaxQuantizer):
    """RepQ-ViT's log-sqrt2 quantizer with its calibrated scale (module
    docstring)."""

    def _fake(self, x, delta, out=None):
        """``D 2^(-ceil(q/2)) (sqrt 2 if q odd)``, computed as the same
        number ``D 2^(-q/2)`` (fewer elementwise passes), in place in one
        tensor (``out`` if given).

        Inputs below ``D 2^(-2^b)`` (``q >= 2^(b+1)``, quantized to 0 in
        any case) are first raised to it, so that ``log2`` never sees 0 or
        a subnormal float (Swin's shifted-window mask makes both, and they
        make ``log2`` 4-10x slower); where that bound is itself subnormal
        (7-8 bits, tiny ``D``) the inputs are left as they are."""
        floor = delta * 2.0**-(2**self.bits)  # a tensor: no device sync
        floor = floor.masked_fill(floor < torch.finfo(x.dtype).tiny, 0)
        q = torch.clamp(x, min=floor, out=out).div_(delta).log2_().mul_(
            -2).round_()
        beyond = q >= 2**self.bits  # past the last level (x = 0: q = inf)
        return q.clamp_(min=0).mul_(-0.5).exp2_().mul_(delta).masked_fill_(
            beyond, 0)

    def _candidates(self, deltas):
        return ((delta, ) for delta in deltas)

    def _set_params(self, delta):
        self.delta = delta.detach().clone()


class TanQuantizer(PostSoftmaxQuantizer):
    """Tangent-encoded quantizer on ``[0, D]`` (module docstring)."""

    TAUS = (1.0, 2.0, 4.0, 8.0, 16.0)

    def __init__(self, bits: int):
        super().__init__(bits)
        self.register_buffer('tau', torch.empty(0))

    def _extra_params(self):
        return (float(self.tau), )

    def _level(self, k, delta, tau):
        """``D l_k = D (1/2 + arctan(tau (2k/K - 1)) / (2 arctan tau))``."""
        levels = 2**self.bits - 1
        return delta * (0.5 + torch.atan(tau * (2 * k / levels - 1)) /
                        (2 * math.atan(tau)))

    def levels_of(self, tau: float, delta: float = 1.0) -> torch.Tensor:
        """The ``2^b`` levels ``D l_k``."""
        return self._level(torch.arange(2**self.bits, dtype=torch.float64),
                           delta, tau)

    def _fake(self, x, delta, tau, out=None):
        levels = 2**self.bits - 1
        u = (x / delta).clamp(0, 1)
        k = torch.round(levels * (1 + torch.tan(
            (2 * u - 1) * math.atan(tau)) / tau) / 2)
        level = self._level(k, delta, tau)
        return level if out is None else out.copy_(level)

    def _candidates(self, deltas):
        return ((delta, tau) for delta in deltas for tau in self.TAUS)

    def _set_params(self, delta, tau):
        self.delta = delta.detach().clone()
        self.tau = torch.tensor(tau)
