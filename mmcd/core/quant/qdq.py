"""A calibrated PTQ model in QuantizeLinear/DequantizeLinear form, for export.

:func:`to_qdq` rewrites, in place, a model that :func:`~mmcd.core.quant.
calibrate` has calibrated, into the form deployment runtimes read:

* every calibrated per-tensor uniform activation quantizer becomes
  :class:`ActivationQDQ`, one ``mmcd::quantize_dequantize`` op (ONNX:
  ``QuantizeLinear`` -> ``DequantizeLinear``; RepQ-ViT's per-channel shift
  of a reparameterized input stays an ``Add`` before and a ``Sub`` after);
* every quantized ``Linear`` / ``Conv2d`` becomes :class:`QDQLinear` /
  :class:`QDQConv2d`: the weight is stored as its integers ``q`` (uint8
  values in ``[0, 2^b - 1]``, or int8 in ``[-2^(b-1), 2^(b-1) - 1]`` with
  zero point 0 for a symmetric quantizer; a Linear's transposed), one
  scale and zero point per output channel, and rebuilt as ``(q - z) s`` by one
  ``mmcd::dequantize`` op (ONNX: ``DequantizeLinear`` on an integer
  initializer, 4-bit types at opset 21);
* the post-softmax quantizers (log-sqrt2, TanQ) have no linear-quantization
  form: they stay as their float formula (:class:`FormulaFakeQuant`: the
  quantizer's own fake quantization, exported as elementwise float ops);
* neither has a uniform quantizer whose zero point is not an integer:
  RepQ-ViT's reparameterization target ``z~`` is the mean of the channels'
  zero points, unrounded as in its code, and ``QuantizeLinear`` takes an
  integer zero point. It stays as its float formula too
  (:class:`UniformFormula`; the exporter's truncated zero point moved every
  clipped value by the fractional part of ``z~``, up to a step: measured on
  the toy W4A4 RepQ-ViT backbone, the feature deviation from the simulation
  fell from 0.19-0.26 to 0.02-0.04 steps on average with the formula).

Both ops compute, in PyTorch, bit for bit what the fake-quantized model
computes (tested), so the rewritten model is the simulation; ``mmcd.deploy``
maps them to ONNX. Pure PyTorch.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .modules import QuantConv2d, QuantLinear
from .quantizers import (FakeQuantizer, PostSoftmaxQuantizer, UniformQuantizer,
                         uniform_fake_quant)


@torch.library.custom_op('mmcd::quantize_dequantize', mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor,
                        zero_point: torch.Tensor, bits: int,
                        signed: bool) -> torch.Tensor:
    """Per-tensor ``(clamp(round(x / s) + z, lo, hi) - z) s`` with
    ``[lo, hi] = [0, 2^b - 1]``, or ``[-2^(b-1), 2^(b-1) - 1]`` when
    ``signed`` (ONNX's int8/int4)."""
    return uniform_fake_quant(x, scale,
                              unsigned_zero_point(zero_point, bits, signed),
                              2**bits - 1)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, bits, signed):
    return torch.empty_like(x)


@torch.library.custom_op('mmcd::dequantize', mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor,
               zero_point: torch.Tensor, bits: int, axis: int,
               signed: bool) -> torch.Tensor:
    """``(q - z) s`` with one ``s``, ``z`` per index of ``axis`` of the
    integer tensor ``q`` (``signed``: ``q`` holds signed integers)."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return (q.to(scale.dtype) - zero_point.view(shape)) * scale.view(shape)


@dequantize.register_fake
def _(q, scale, zero_point, bits, axis, signed):
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


def unsigned_zero_point(zero_point: torch.Tensor, bits: int,
                        signed: bool) -> torch.Tensor:
    """The zero point of the same grid on unsigned codes ``[0, 2^b - 1]``
    (a signed grid's ``z + 2^(b-1)``)."""
    return zero_point + 2**(bits - 1) if signed else zero_point


def signed_shift(quantizer: UniformQuantizer) -> int:
    """What a symmetric quantizer's codes and zero point lose to become
    signed integers (``2^(b-1)``: zero point 0), 0 for an asymmetric one."""
    return quantizer.signed_zero if quantizer.symmetric else 0


class ActivationQDQ(nn.Module):
    """A calibrated per-tensor :class:`UniformQuantizer` as one
    quantize-dequantize op (its per-channel offset, if any, around it)."""

    def __init__(self, quantizer: UniformQuantizer):
        super().__init__()
        if quantizer.channel_axis is not None:
            raise ValueError(f'{quantizer.layer_name}: per-channel activation'
                             ' quantizers have no QDQ form here')
        self.bits, self.signed = quantizer.bits, quantizer.symmetric
        self.register_buffer('scale', quantizer.scale.detach().clone())
        self.register_buffer(
            'zero_point',
            quantizer.zero_point.detach() - signed_shift(quantizer))
        self.register_buffer('offset',
                             quantizer.channel_offset.detach().clone())

    def forward(self, x):
        if self.offset.numel():
            return self.quantize(x + self.offset) - self.offset
        return self.quantize(x)

    def quantize(self, x):
        return quantize_dequantize(x, self.scale, self.zero_point, self.bits,
                                   self.signed)

    def extra_repr(self):
        return f'bits={self.bits}' + (', signed' if self.signed else '')


class FormulaFakeQuant(nn.Module):
    """A post-softmax quantizer (no QDQ form) applied as its float formula,
    on the whole tensor at once (exports as elementwise ops)."""

    def __init__(self, quantizer: PostSoftmaxQuantizer):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x):
        return self.quantizer.fake_quantize(x)


class UniformFormula(ActivationQDQ):
    """A calibrated per-tensor :class:`UniformQuantizer` whose zero point is
    not an integer, as its formula ``(clamp(round((x + t) / s) + z, 0,
    2^b - 1) - z) s - t`` in float ops (module docstring)."""

    def quantize(self, x):
        return uniform_fake_quant(
            x, self.scale,
            unsigned_zero_point(self.zero_point, self.bits, self.signed),
            2**self.bits - 1)


def _exporting() -> bool:
    """Whether an ONNX export is tracing the model: ``torch.export``
    (mmcd's features export) or the TorchScript tracer (mmdeploy's
    end-to-end export)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


class IntegerWeightMixin:
    """The weight as integers, per-output-channel scale and zero point."""

    #: the axis of the output channels in the stored integers
    channel_axis = 0

    def _take_weight(self, layer):
        quantizer = layer.weight_quantizer
        if quantizer.state != 'quant' or not quantizer.calibrated:
            raise ValueError(f'{quantizer.layer_name} is not calibrated')
        shift = signed_shift(quantizer)
        scale = quantizer.scale.detach()
        zero = quantizer.zero_point.detach() - shift
        integers = quantizer.codes(layer.weight.detach()) - shift
        if self.channel_axis == 1:  # stored as [in, out]
            integers = integers.t()
        self.bits, self.signed = quantizer.bits, quantizer.symmetric
        self.register_buffer(
            'weight_int',
            integers.to(torch.int8 if self.signed else torch.uint8)
            .contiguous())
        self.register_buffer('weight_scale', scale.clone())
        self.register_buffer('weight_zero_point', zero.clone())
        self.input_qdq = _activation_module(layer.input_quantizer)

    def dequantized_weight(self):
        return dequantize(self.weight_int, self.weight_scale,
                          self.weight_zero_point, self.bits,
                          self.channel_axis, self.signed)


class QDQLinear(IntegerWeightMixin, nn.Module):
    """The weight stored transposed, ``[in, out]``. Under export, ``x W^T +
    b`` is written ``MatMul(x, DequantizeLinear(W^T)) + b``, with no
    ``Transpose`` between the weight's DequantizeLinear and the MatMul: the
    pattern onnxruntime fuses into an integer kernel
    (``MatMulIntegerToFloat``). Eagerly it is ``F.linear``, as in the
    fake-quantized model, so the rewrite stays bit-exact in PyTorch."""
    channel_axis = 1

    def __init__(self, layer: QuantLinear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, \
            layer.out_features
        self._take_weight(layer)
        # RepQ-ViT's shift leaves through the float weight (QuantLinear)
        bias = layer.shift_corrected_bias(layer.effective_weight())
        self.bias = bias if bias is None or bias is layer.bias else \
            nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x):
        x, weight = self.input_qdq(x), self.dequantized_weight()
        if not _exporting():
            return F.linear(x, weight.t().contiguous(), self.bias)
        out = torch.matmul(x, weight)
        return out if self.bias is None else out + self.bias


class QDQConv2d(IntegerWeightMixin, nn.Module):
    """Under export the bias is added after the convolution
    (``Conv(x, DequantizeLinear(W)) + b``). With the bias inside the Conv,
    onnxruntime fuses a Conv whose output (through ReLU) feeds the next
    quantizer into ``QLinearConv`` and rounds the float bias to int32 at
    scale ``s_x s_w``, a quantization this model does not contain (measured
    on the toy W4A4 mask head: 0.34% of the next 4-bit input one step away;
    tested). Eagerly it is ``F.conv2d`` with the bias, as in the
    fake-quantized model."""

    def __init__(self, layer: QuantConv2d):
        super().__init__()
        self.bias = layer.bias
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        if layer.padding_mode != 'zeros':
            raise ValueError(f'{layer.weight_quantizer.layer_name}: padding '
                             f'mode {layer.padding_mode!r} is not exported')
        self._take_weight(layer)

    def forward(self, x):
        x, weight = self.input_qdq(x), self.dequantized_weight()
        if self.bias is None or not _exporting():
            return F.conv2d(x, weight, self.bias, self.stride, self.padding,
                            self.dilation, self.groups)
        out = F.conv2d(x, weight, None, self.stride, self.padding,
                       self.dilation, self.groups)
        return out + self.bias.view(1, -1, 1, 1)


def _activation_module(quantizer: FakeQuantizer) -> nn.Module:
    if quantizer.state != 'quant':  # unreached by calibration: float
        return nn.Identity()
    if isinstance(quantizer, UniformQuantizer):
        zero = quantizer.zero_point
        if quantizer.channel_axis is None and not torch.equal(zero,
                                                              zero.round()):
            return UniformFormula(quantizer)
        return ActivationQDQ(quantizer)
    if isinstance(quantizer, PostSoftmaxQuantizer):
        return FormulaFakeQuant(quantizer)
    raise ValueError(f'{quantizer.layer_name}: {type(quantizer).__name__} '
                     'has no export form')


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def to_qdq(model: nn.Module) -> Dict[str, List[str]]:
    """Rewrite a calibrated PTQ model in place (module docstring). Returns
    the layer names by form: ``qdq`` (activations as QuantizeLinear/
    DequantizeLinear), ``integer_weights``, ``float_formula`` (post-softmax
    quantizers), ``fractional_zero`` (uniform quantizers with a non-integer
    zero point, as their float formula) and ``float`` (quantizers
    calibration never reached).

    Raises ``ValueError`` on a model with no calibrated quantizer, or with
    a quantized layer whose weight was never quantized.
    """
    quantizers = {name: m for name, m in model.named_modules()
                  if isinstance(m, FakeQuantizer)}
    if not any(q.state == 'quant' for q in quantizers.values()):
        raise ValueError('the model has no calibrated quantizer: convert it '
                         'with quantize_model and run calibrate first')
    if any(getattr(q, 'trainable', False) for q in quantizers.values()):
        raise ValueError('QAT models are not exported here; export a PTQ '
                         'model (quantize_model + calibrate)')
    report = dict(qdq=[], integer_weights=[], float_formula=[],
                  fractional_zero=[], float=[])
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, QuantConv2d)):
            qdq = (QDQLinear if isinstance(module, QuantLinear)
                   else QDQConv2d)(module)
            _set_module(model, name, qdq)
            report['integer_weights'].append(name)
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantizer):
            replacement = _activation_module(module)
            _set_module(model, name, replacement)
    for name, module in model.named_modules():
        kind = {ActivationQDQ: 'qdq', FormulaFakeQuant: 'float_formula',
                UniformFormula: 'fractional_zero'}.get(type(module))
        if kind:
            report[kind].append(name)
    report['float'] = [n for n, q in quantizers.items()
                       if q.state != 'quant']
    return report
