"""A calibrated PTQ model in QuantizeLinear/DequantizeLinear form, for export.

:func:`to_qdq` rewrites, in place, a model that :func:`~mmcd.core.quant.
calibrate` has calibrated, into the form deployment runtimes read:

* every calibrated per-tensor uniform activation quantizer becomes
  :class:`ActivationQDQ`, one ``mmcd::quantize_dequantize`` op (ONNX:
  ``QuantizeLinear`` -> ``DequantizeLinear``; RepQ-ViT's per-channel shift
  of a reparameterized input stays an ``Add`` before and a ``Sub`` after);
* every quantized ``Linear`` / ``Conv2d`` becomes :class:`QDQLinear` /
  :class:`QDQConv2d`: the weight is stored as signed integers ``q`` in
  ``[-2^(b-1), 2^(b-1) - 1]`` (the codes ``[0, 2^b - 1]`` and the zero
  point shifted by ``2^(b-1)``, which leaves ``q - z`` unchanged; a
  symmetric quantizer's zero point becomes 0; a Linear's transposed), one
  scale and zero point per output channel, and rebuilt as ``(q - z) s`` by
  one ``mmcd::dequantize`` op (ONNX: ``DequantizeLinear`` on an ``int8``
  initializer, ``int4`` up to 4 bits at opset 21). Signed weights because
  onnxruntime's fast integer kernels multiply unsigned activations by
  signed weights (``u8s8``, VNNI): measured on this machine's CPU, one
  thread, a 4096x2304 by 2304x256 ``MatMulIntegerToFloat``: int8 weights
  10.1 ms, uint8 weights 47.9 ms, float ``MatMul`` 67.7 ms;
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
  fell from 0.19-0.26 to 0.02-0.04 steps on average with the formula);
* per-head grids of an attention matmul's operands (``aphq-vit``) stay as
  their float formula as well (:class:`ChannelFormula`; the integer
  profiles make them per tensor).

Under the ``onnxruntime-integer`` profile both have an integer form: the
reparameterization's target zero point is an integer, and the shift ``t``
of such an input folds into the Linear's bias (:class:`QDQLinear`), so that
``Add -> QuantizeLinear -> DequantizeLinear -> MatMul`` fuses into an
integer kernel.

The ops compute, in PyTorch, bit for bit what the fake-quantized model
computes (tested; the folded shift: to float rounding), so the rewritten
model is the simulation; ``mmcd.deploy`` maps them to ONNX. Pure PyTorch.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .modules import QuantConv2d, QuantLinear
from .profiles import DEFAULT_PROFILE, DEPLOY_PROFILES
from .quantizers import (FakeQuantizer, PostSoftmaxQuantizer, UniformQuantizer,
                         broadcast_along, uniform_codes, uniform_fake_quant)


def integer_levels(bits: int, signed: bool) -> Tuple[int, int]:
    """The smallest and largest integer of a ``bits``-wide grid."""
    return (-2**(bits - 1), 2**(bits - 1) - 1) if signed else \
        (0, 2**bits - 1)


@torch.library.custom_op('mmcd::quantize', mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
             bits: int, signed: bool) -> torch.Tensor:
    """Per-tensor integer codes ``clamp(round(x / s) + z, lo, hi)`` in an
    8-bit tensor whatever the width (``uint8``; ``int8`` when ``signed``),
    ``[lo, hi]`` as in :func:`quantize_dequantize`."""
    lo, hi = integer_levels(bits, signed)
    codes = uniform_codes(x, scale, zero_point, lo, hi)
    return codes.to(torch.int8 if signed else torch.uint8)


@quantize.register_fake
def _(x, scale, zero_point, bits, signed):
    return torch.empty_like(x, dtype=torch.int8 if signed else torch.uint8)


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
    return (q.to(scale.dtype) - broadcast_along(zero_point, axis, q.dim())) \
        * broadcast_along(scale, axis, q.dim())


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
    signed integers (``2^(b-1)``: zero point 0), 0 for an asymmetric one
    (activations: the profile decides the grid's type)."""
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

    #: whether the offset is subtracted again after quantizing (False when
    #: the consuming QDQLinear folds it into its bias)
    subtract_offset = True

    def forward(self, x):
        if not self.offset.numel():
            return self.quantize(x)
        quantized = self.quantize(x + self.offset)
        return quantized - self.offset if self.subtract_offset else quantized

    def quantize(self, x):
        return quantize_dequantize(x, self.scale, self.zero_point, self.bits,
                                   self.signed)

    def codes(self, x):
        """The integer codes of ``x`` in an 8-bit tensor (no offset)."""
        return quantize(x, self.scale, self.zero_point, self.bits,
                        self.signed)

    def from_codes(self, codes):
        """``(q - z) s`` of :meth:`codes`' integers (per tensor: the axis
        does not matter; 8: the container's width)."""
        return dequantize(codes, self.scale, self.zero_point, 8, 0,
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


class ChannelFormula(nn.Module):
    """A calibrated per-channel activation quantizer (the per-head grids of
    an attention matmul's operand) as its formula ``(clamp(round(x / s_c)
    + z_c, 0, 2^b - 1) - z_c) s_c`` in float ops, ``s_c``, ``z_c`` along
    its ``channel_axis``."""

    def __init__(self, quantizer: UniformQuantizer):
        super().__init__()
        self.axis, self.levels = quantizer.channel_axis, quantizer.levels
        self.register_buffer('scale', quantizer.scale.detach().clone())
        self.register_buffer('zero_point',
                             quantizer.zero_point.detach().clone())

    def forward(self, x):
        return uniform_fake_quant(
            x, broadcast_along(self.scale, self.axis, x.dim()),
            broadcast_along(self.zero_point, self.axis, x.dim()), self.levels)


def _exporting() -> bool:
    """Whether an ONNX export is tracing the model: ``torch.export``
    (mmcd's features export) or the TorchScript tracer (mmdeploy's
    end-to-end export)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


class IntegerWeightMixin:
    """The weight as integers, per-output-channel scale and zero point."""

    #: the axis of the output channels in the stored integers
    channel_axis = 0
    #: whether the export writes the product in the form onnxruntime folds
    #: the bias into its integer kernel from (the profile's
    #: ``bias_in_integer_kernel``; ``mmcd.deploy.integer_bias``)
    bias_in_kernel = False

    def _stored(self, integers: torch.Tensor) -> torch.Tensor:
        """The layout the integers are stored in (the layer's weight's)."""
        return integers

    def _take_weight(self, layer):
        quantizer = layer.weight_quantizer
        if quantizer.state != 'quant' or not quantizer.calibrated:
            raise ValueError(f'{quantizer.layer_name} is not calibrated')
        shift = quantizer.signed_zero  # signed storage (module docstring)
        scale = quantizer.scale.detach()
        zero = quantizer.zero_point.detach() - shift
        if zero.min() < -shift or zero.max() >= shift:
            raise ValueError(
                f'{quantizer.layer_name}: a weight zero point outside the '
                f'{quantizer.bits}-bit grid (a clip range not containing 0) '
                'has no integer form; use a range search that keeps 0')
        integers = self._stored(quantizer.codes(layer.weight.detach()) -
                                shift)
        self.bits, self.signed = quantizer.bits, True
        self.register_buffer('weight_int',
                             integers.to(torch.int8).contiguous())
        self.register_buffer('weight_scale', scale.clone())
        self.register_buffer('weight_zero_point', zero.clone())

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
    fake-quantized model, so the rewrite stays bit-exact in PyTorch.
    ``fold_shift`` (profiles with ``integer_target``): a reparameterized
    input quantized with an integer zero point has its shift ``t`` folded
    into the bias (``W_q Q(x + t) + b - W t``; no float ``Sub`` between the
    activation's DequantizeLinear and the MatMul, which onnxruntime then
    fuses into its integer kernel): equal to float rounding."""
    channel_axis = 1

    def _stored(self, integers):
        return integers.t()

    def __init__(self, layer: QuantLinear, fold_shift: bool = False):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, \
            layer.out_features
        self.input_qdq = _activation_module(layer.input_quantizer)
        self._take_weight(layer)
        if fold_shift and isinstance(self.input_qdq, ActivationQDQ) and \
                self.input_qdq.offset.numel():
            # W_q (Q(x + t) - t) + b + (W_q - W) t = W_q Q(x + t) + b - W t:
            # no float Sub between DequantizeLinear and MatMul, which
            # onnxruntime then fuses into its integer kernel
            self.input_qdq.subtract_offset = False
            bias = F.linear(-self.input_qdq.offset.to(layer.weight.dtype),
                            layer.weight, layer.bias)
        else:  # RepQ-ViT's shift leaves through the float weight
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
    fake-quantized model.

    ``integer_matmul`` (the profile's
    :attr:`~mmcd.core.quant.profiles.DeployProfile.conv_as_integer_matmul`):
    under export the convolution is written as im2col on the input's
    integer codes and one matrix product, ``DequantizeLinear(patches) @
    DequantizeLinear(W)``, the pattern onnxruntime fuses into its integer
    kernel with a float output (``MatMulIntegerToFloat``); it has none for
    a Conv whose output is not quantized again, which is every Conv here:
    mmcd quantizes layer inputs. The patches are the input's codes
    (``QuantizeLinear``), channels last, padded with the zero point's code
    (the dequantized padding is 0, as the float Conv pads), one strided
    ``Slice`` per kernel offset concatenated along the channels; the
    weight is stored ``[kh kw C_in, C_out]`` in the same order. Taken where
    the input quantizer is a plain per-tensor grid (no RepQ-ViT shift, an
    integer zero point), ``groups == 1`` and weights of 5-8 bits (4-bit
    ones are ``int4`` initializers, which that kernel does not take);
    elsewhere the Conv form."""

    def __init__(self, layer: QuantConv2d, integer_matmul: bool = False):
        super().__init__()
        self.bias = layer.bias
        self.kernel_size = layer.kernel_size
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        if layer.padding_mode != 'zeros':
            raise ValueError(f'{layer.weight_quantizer.layer_name}: padding '
                             f'mode {layer.padding_mode!r} is not exported')
        self.input_qdq = _activation_module(layer.input_quantizer)
        self.integer_matmul = (
            integer_matmul and self.groups == 1 and
            layer.weight_quantizer.bits > 4 and
            type(self.input_qdq) is ActivationQDQ and
            not self.input_qdq.offset.numel() and
            not isinstance(self.padding, str))
        if self.integer_matmul:
            self.channel_axis = 1
            self.pad_code = int(self.input_qdq.zero_point)
        self._take_weight(layer)

    def _stored(self, integers):
        if not self.integer_matmul:
            return integers
        return integers.permute(0, 2, 3, 1).flatten(1).t()

    def dequantized_weight(self):
        weight = super().dequantized_weight()
        if not self.integer_matmul:
            return weight
        kh, kw = self.kernel_size
        return weight.t().reshape(weight.shape[1], kh, kw, -1).permute(
            0, 3, 1, 2)

    def forward(self, x):
        if self.integer_matmul and _exporting():
            return self._integer_matmul_conv(x)
        x, weight = self.input_qdq(x), self.dequantized_weight()
        if self.bias is None or not _exporting():
            return F.conv2d(x, weight, self.bias, self.stride, self.padding,
                            self.dilation, self.groups)
        out = F.conv2d(x, weight, None, self.stride, self.padding,
                       self.dilation, self.groups)
        return out + self.bias.view(1, -1, 1, 1)

    def _integer_matmul_conv(self, x):
        """im2col on the codes, one matrix product (class docstring)."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        (ph, pw), (dh, dw) = self.padding, self.dilation
        codes = self.input_qdq.codes(x).permute(0, 2, 3, 1)
        if ph or pw:
            codes = F.pad(codes, (0, 0, pw, pw, ph, ph), value=self.pad_code)
        n, h, w, _ = codes.shape
        out_h = (h - dh * (kh - 1) - 1) // sh + 1
        out_w = (w - dw * (kw - 1) - 1) // sw + 1
        columns = [codes[:, i * dh:i * dh + sh * (out_h - 1) + 1:sh,
                         j * dw:j * dw + sw * (out_w - 1) + 1:sw]
                   for i in range(kh) for j in range(kw)]
        patches = columns[0] if len(columns) == 1 else torch.cat(columns, 3)
        out = torch.matmul(
            self.input_qdq.from_codes(patches.reshape(n * out_h * out_w, -1)),
            IntegerWeightMixin.dequantized_weight(self))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(n, out_h, out_w, -1).permute(0, 3, 1, 2)


def _activation_module(quantizer: FakeQuantizer) -> nn.Module:
    if quantizer.state != 'quant':  # unreached by calibration: float
        return nn.Identity()
    if isinstance(quantizer, UniformQuantizer):
        zero = quantizer.zero_point
        if quantizer.channel_axis is not None:
            return ChannelFormula(quantizer)
        if not torch.equal(zero, zero.round()):
            return UniformFormula(quantizer)
        return ActivationQDQ(quantizer)
    if isinstance(quantizer, PostSoftmaxQuantizer):
        return FormulaFakeQuant(quantizer)
    raise ValueError(f'{quantizer.layer_name}: {type(quantizer).__name__} '
                     'has no export form')


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def to_qdq(model: nn.Module,
           profile: str = DEFAULT_PROFILE) -> Dict[str, List[str]]:
    """Rewrite a calibrated PTQ model in place (module docstring), for the
    runtime of the deployment ``profile`` the model was quantized for
    (:data:`~mmcd.core.quant.profiles.DEPLOY_PROFILES`). Returns
    the layer names by form: ``qdq`` (activations as QuantizeLinear/
    DequantizeLinear), ``integer_weights``, ``float_formula`` (post-softmax
    quantizers, per-head grids), ``fractional_zero`` (uniform quantizers
    with a non-integer zero point, as their float formula) and ``float``
    (quantizers calibration never reached).

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
    deploy = DEPLOY_PROFILES.get(profile)
    conv_as_matmul = deploy.conv_as_integer_matmul
    fold_shift = deploy.integer_target
    report = dict(qdq=[], integer_weights=[], float_formula=[],
                  fractional_zero=[], float=[])
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, QuantConv2d)):
            qdq = QDQLinear(module, fold_shift) \
                if isinstance(module, QuantLinear) \
                else QDQConv2d(module, conv_as_matmul)
            qdq.bias_in_kernel = deploy.bias_in_integer_kernel
            _set_module(model, name, qdq)
            report['integer_weights'].append(name)
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantizer):
            replacement = _activation_module(module)
            _set_module(model, name, replacement)
    for name, module in model.named_modules():
        kind = {ActivationQDQ: 'qdq', FormulaFakeQuant: 'float_formula',
                ChannelFormula: 'float_formula',
                UniformFormula: 'fractional_zero'}.get(type(module))
        if kind:
            report[kind].append(name)
    report['float'] = [n for n, q in quantizers.items()
                       if q.state != 'quant']
    return report
