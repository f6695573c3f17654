"""Quantized modules: Linear, Conv2d and the attention matmuls, and the
registry that maps a float module's class to its quantized twin.

``QuantLinear`` / ``QuantConv2d`` subclass their float layer and share its
parameters, so module names and checkpoint keys are unchanged (CD's pair
rules still match) and the float weights are never modified: the
fake-quantized weight is computed once by :meth:`finalize` and kept in a
non-persistent buffer (QAT: qat.py swaps in trainable quantizers, applied in
every forward pass). The input (activation) is fake-quantized per tensor,
the weight per output channel.

:data:`QUANTIZED_MODULES` holds, by float class, the factory
``factory(module, w_bits, a_bits, method) -> twin`` that
:func:`~mmcd.core.quant.quantize_model` calls on every module in scope
(found along the module's class hierarchy, so subclasses of ``nn.Linear``
get the Linear twin); a twin derives from :class:`QuantizedModule`, which
conversion never wraps again. Built in: ``nn.Linear``, ``nn.Conv2d``,
:class:`MatMul`; Swin's ``WindowMSA`` is registered in ``mmcd.models``
(it needs mmdet). Pure PyTorch.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry
from .aphq_searches import MATMUL_SEARCHES
from .methods import get_method
from .quantizers import FakeQuantizer, UniformQuantizer

#: Quantized twins by float module class (module docstring).
QUANTIZED_MODULES = Registry('quantized twin')
#: attention modules whose own computation stays in float, keyed by type,
#: each with why (e.g. a gather where no matmul is): conversion accepts them
#: without a twin, quantizes the Linears inside them and lists them as float
#: in the precision plan; registered where their library is imported
#: (mmcd.models: mmcv's ``MultiScaleDeformableAttention``)
FLOAT_ATTENTION_KERNELS = Registry('attention computed in float')


class QuantizedModule:
    """Base of every quantized twin (conversion skips these)."""


class QuantWeightMixin(QuantizedModule):
    """Weight and input quantizers around a float layer's forward."""
    #: whether the method's Conv2d searches apply (QuantMethod)
    is_conv = False

    def _init_quant(self, w_bits: int, a_bits: int, method):
        method = get_method(method)
        self.weight_quantizer = method.weight_quantizer(w_bits, self.is_conv)
        self.input_quantizer = method.act_quantizer(a_bits, self.is_conv)
        self.register_buffer('quant_weight', None, persistent=False)

    @classmethod
    def from_float(cls, layer, w_bits: int, a_bits: int, method):
        """The quantized twin of ``layer`` (sharing its parameters);
        ``method`` a registered name or a
        :class:`~mmcd.core.quant.methods.QuantMethod`."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in layer.__dict__.items()
                             if k not in ('_modules', '_parameters',
                                          '_buffers')})
        new._parameters = dict(layer._parameters)  # shared Parameters
        new._buffers = dict(layer._buffers)
        new._modules = dict(layer._modules)
        new._init_quant(w_bits, a_bits, method)
        return new

    def finalize_weight(self) -> None:
        """Search the weight quantizer's grid, then :meth:`cache_weight`."""
        self.weight_quantizer.finalize(self.weight)
        self.cache_weight()

    def cache_weight(self) -> None:
        """Switch the (calibrated) weight quantizer on and keep the
        fake-quantized weight (PTQ; QAT quantizes in every pass)."""
        self.weight_quantizer.set_state('quant')
        if not self.weight_quantizer.trainable:
            self.quant_weight = self.weight_quantizer(self.weight.detach())

    def effective_weight(self):
        """The float weight, its cached PTQ fake-quantized copy, or (QAT)
        the weight fake-quantized in this forward pass, with gradients."""
        quantizer = self.weight_quantizer
        if quantizer.state != 'quant':
            return self.weight
        if quantizer.trainable:
            return quantizer(self.weight)
        return self.quant_weight


class QuantLinear(QuantWeightMixin, nn.Linear):
    """A fake-quantized Linear. Behind a RepQ-ViT reparameterized input
    (reparam.py: the input quantizer computes ``Q(x + t) - t`` with the
    per-channel shift ``t``) the output is RepQ-ViT's quantized function,
    ``W_q Q(x + t) + b - W t``: the shift leaves through the *float* weight,
    as RepQ-ViT folds ``W t`` into the float bias, not through ``W_q``.
    :meth:`shift_corrected_bias` adds ``(W_q - W) t`` to the bias for that.
    """

    def forward(self, x):
        weight = self.effective_weight()
        return F.linear(self.input_quantizer(x), weight,
                        self.shift_corrected_bias(weight))

    def shift_corrected_bias(self, weight):
        """``b + (W_q - W) t`` for the quantized ``weight`` ``W_q`` when the
        input quantizer shifts its input by ``t`` (and quantizes), else
        ``b``: ``W_q (Q(x + t) - t) + b + (W_q - W) t = W_q Q(x + t) + b -
        W t``, RepQ-ViT's function (Li et al., ICCV 2023, eq. 9-10: ``W t``
        folded into the bias in float)."""
        offset = getattr(self.input_quantizer, 'channel_offset', None)
        if offset is None or not offset.numel() or weight is self.weight \
                or self.input_quantizer.state != 'quant':
            return self.bias
        correction = F.linear(offset.to(weight.dtype), weight - self.weight)
        return correction if self.bias is None else self.bias + correction


class QuantConv2d(QuantWeightMixin, nn.Conv2d):
    is_conv = True

    def forward(self, x):
        return self._conv_forward(self.input_quantizer(x),
                                  self.effective_weight(), self.bias)


class MatMul(nn.Module):
    """``a @ b`` as a module, so that quantization can take it over.

    ``role`` is ``'qk'`` (attention logits) or ``'av'`` (post-softmax
    weights times values): it picks the quantizer of ``a``. ``heads``: the
    attention's head count, the operands' leading dimension being ``batch *
    heads`` (or ``[batch, heads, ...]``), for a method that quantizes them
    per head. Attention written with these (mmcd's ViTDet) needs no
    quantization-aware rewrite.
    """
    ROLES = ('qk', 'av')

    def __init__(self, role: str, heads: Optional[int] = None):
        super().__init__()
        if role not in self.ROLES:
            raise ValueError(f'MatMul role must be one of {self.ROLES}')
        self.role, self.heads = role, heads

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b

    def extra_repr(self) -> str:
        return f'role={self.role}, heads={self.heads}'


class QuantMatMul(QuantizedModule, nn.Module):
    """``a @ b`` with both operands fake-quantized (identity until
    calibrated). With ``heads`` and a method's ``matmul_search``
    (:data:`~mmcd.core.quant.aphq_searches.MATMUL_SEARCHES`) each operand
    is quantized per head (its quantizers' ``channel_axis`` 1 on the
    operand viewed as ``[batch, heads, ...]``) and the two are calibrated
    together by that search."""

    def __init__(self, quantizer_a: FakeQuantizer,
                 quantizer_b: FakeQuantizer, heads: Optional[int] = None,
                 search: Optional[str] = None):
        super().__init__()
        self.quantizer_a, self.quantizer_b = quantizer_a, quantizer_b
        self.heads, self.search = heads, search

    @classmethod
    def for_role(cls, role: str, a_bits: int, method,
                 heads: Optional[int] = None) -> 'QuantMatMul':
        """Uniform quantizers for ``q @ k^T``; the method's post-softmax
        quantizer for the ``a`` of ``attn @ v``; per-head uniform ones for
        both when the method has a ``matmul_search`` and ``heads`` is
        known."""
        method = get_method(method)
        if method.matmul_search is not None and heads is not None:
            return cls(*(UniformQuantizer(a_bits, 1, method.act_search,
                                          symmetric=method.symmetric)
                         for _ in 'ab'), heads, method.matmul_search)
        first = method.softmax_quantizer(a_bits) if role == 'av' \
            else method.act_quantizer(a_bits)
        return cls(first, method.act_quantizer(a_bits))

    @property
    def searching(self) -> bool:
        """Whether the next call runs the joint search (both operands'
        quantizers waiting for calibration)."""
        return self.search is not None and all(
            getattr(q, 'state', None) == 'calib'
            for q in (self.quantizer_a, self.quantizer_b))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.search is None:
            return self.quantizer_a(a) @ self.quantizer_b(b)
        shape = a.shape[:-1] + b.shape[-1:]
        a, b = (x.reshape(-1, self.heads, *x.shape[-2:]) for x in (a, b))
        if self.searching:
            MATMUL_SEARCHES.get(self.search)(
                self.quantizer_a, self.quantizer_b, a.detach(), b.detach())
        return (self.quantizer_a(a) @ self.quantizer_b(b)).reshape(shape)


QUANTIZED_MODULES.register(QuantLinear.from_float, name=nn.Linear)
QUANTIZED_MODULES.register(QuantConv2d.from_float, name=nn.Conv2d)
QUANTIZED_MODULES.register(
    lambda matmul, w_bits, a_bits, method: QuantMatMul.for_role(
        matmul.role, a_bits, method, matmul.heads), name=MatMul)
