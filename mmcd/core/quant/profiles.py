"""Deployment profiles: what a runtime's integer kernels run, as constraints
on the quantization, applied before calibration so that the simulation
computes what the runtime will.

A :class:`DeployProfile` is one registered instance
(``DEPLOY_PROFILES.register(DeployProfile(...))``); ``QuantConfig(profile=
NAME)`` applies it to the method (:meth:`DeployProfile.apply`) and refuses
what the runtime cannot run before anything is converted
(:meth:`DeployProfile.check_bits`). Built in:

=======================  ========  ============  ============  ====
name                     integers  zero point    post-softmax  bits
=======================  ========  ============  ============  ====
``onnxruntime``          unsigned  the method's  the method's  2..8
``onnxruntime-integer``  unsigned  integer       uniform       2..8
``tensorrt``             signed    0             uniform       8
=======================  ========  ============  ============  ====

``onnxruntime`` is the method as published: RepQ-ViT's fractional target
zero point and the log-sqrt2 / TanQ post-softmax quantizers have no
QuantizeLinear form and export as float formulas (qdq.py), which
onnxruntime runs in float (measured: the toy's W8A8 RepQ-ViT backbone +
neck 1.9x slower than float, docs/en/deployment.md).
``onnxruntime-integer`` gives every quantizer an integer form: the
reparameterization's target zero point rounded (reparam.py: each channel's
codes are then exactly its per-channel quantizer's), a uniform post-softmax
quantizer and per-tensor matmul grids. Reconstruction keeps every profile's
grids: its learned activation steps keep the calibrated zero point
(learned_step.py), its rounded weights are integer codes.

``tensorrt`` is TensorRT's explicit quantization (its developer guide,
"Working with Quantized Types"): INT8 ``QuantizeLinear`` /
``DequantizeLinear`` with zero point 0 only, per-tensor activation scales,
per-channel weight scales along the output channels. The symmetric grid of
:class:`~mmcd.core.quant.quantizers.UniformQuantizer` computes it
(``s = max(|lo|, |hi|) / 127`` on the range the method's search picks).
What changes against the method as published, and why:

* every grid is symmetric: a one-sided input (after GELU or softmax) uses
  half of the 256 codes;
* the post-softmax quantizer is uniform: log-sqrt2 and TanQ have no
  Q/DQ form; per-head matmul grids (``aphq-vit``) are per tensor;
* RepQ-ViT's reparameterization keeps its scale half only: every
  per-channel zero point is ``2^(b-1)``, so the target's is too and the
  shift ``t`` is 0 (reparam.py);
* 8-bit weights and activations only (the profile's INT8);
* the residual input of the residual additions (Swin's and ViTDet's
  blocks) is quantized per tensor, as TensorRT's placement guide asks,
  so that each addition fuses into the layer before it (residual.py).

docs/en/deployment.md has the measured cost. Pure PyTorch.
"""
from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence, Tuple

from ..errors import ConfigError
from ..registry import Registry
from .methods import QuantMethod
from .quantizers import UniformQuantizer


@dataclass(frozen=True)
class DeployProfile:
    """A runtime's constraints: ``runtime`` (for messages), ``symmetric``
    (signed integers, zero point 0), ``softmax`` (a registered post-softmax
    quantizer replacing the method's when that one is not uniform; None
    keeps it), ``bits`` (the widths
    it runs; None: any of 2..8), ``integer_target`` (RepQ-ViT's
    reparameterization target zero point rounded to an integer),
    ``conv_as_integer_matmul`` (export
    quantized convolutions as im2col + an integer matrix product, the form
    the runtime has a fast kernel for, :class:`~mmcd.core.quant.qdq.
    QDQConv2d`; False: ``DequantizeLinear`` -> ``Conv``),
    ``bias_in_integer_kernel`` (export an 8-bit Linear's or integer-matmul
    convolution's product in the form the runtime folds the bias into its
    integer kernel from, ``mmcd.deploy.integer_bias``),
    ``per_tensor_activations`` (every activation grid per tensor, as a
    ``QuantizeLinear`` the runtime runs in integers: a method's per-head
    matmul grids become per tensor), ``residual_adds`` (the residual input
    of residual additions quantized, where the runtime fuses the addition
    into the layer before it: residual.py)."""
    name: str
    runtime: str
    symmetric: bool = False
    softmax: Optional[str] = None
    bits: Optional[Tuple[int, ...]] = None
    integer_target: bool = False
    conv_as_integer_matmul: bool = False
    bias_in_integer_kernel: bool = False
    per_tensor_activations: bool = False
    residual_adds: bool = False

    def apply(self, method: QuantMethod) -> QuantMethod:
        """``method`` under this profile (itself when nothing changes)."""
        changes = {}
        if self.symmetric and not method.symmetric:
            changes['symmetric'] = True
        if self.softmax is not None and self.softmax != method.softmax \
                and not isinstance(method.softmax_quantizer(8),
                                   UniformQuantizer):
            changes['softmax'] = self.softmax
        if self.integer_target and method.reparameterize and \
                not method.integer_target:
            changes['integer_target'] = True
        if self.per_tensor_activations and method.matmul_search is not None:
            changes['matmul_search'] = None
        if self.residual_adds and not method.residual_adds:
            changes['residual_adds'] = True
        if not changes:
            return method
        return replace(method, name=f'{method.name}@{self.name}', **changes)

    def check_bits(self, bits_of: Dict[str, Sequence[int]]) -> None:
        """Refuse, in one line, the bit widths this runtime has no kernel
        for; ``bits_of`` maps what sets them (a layer's name, or a setting
        such as ``'a_bits=4'``) to its widths."""
        if self.bits is None:
            return
        wrong = sorted(name for name, widths in bits_of.items()
                       if not set(widths) <= set(self.bits))
        if wrong:
            widths = sorted({b for name in wrong for b in bits_of[name]
                             if b not in self.bits})
            top = self.bits[-1]
            raise ConfigError(
                f'profile {self.name!r} ({self.runtime}) runs '
                f'{_widths(self.bits)} integers only, not the '
                f'{_widths(widths)} of {_first(wrong)}: choose '
                f'w{top}a{top}, keep those layers at {top} bits with '
                "layer_bits, or use profile 'onnxruntime'")


def _widths(bits: Sequence[int]) -> str:
    return '/'.join(f'{b}-bit' for b in bits)


def _first(names: Sequence[str], count: int = 3) -> str:
    more = len(names) - count
    return ', '.join(names[:count]) + (f' and {more} more layer(s)'
                                       if more > 0 else '')


#: Deployment profiles by name.
DEPLOY_PROFILES = Registry('deployment profile')
#: the profile of a model quantized without one: the method as published
DEFAULT_PROFILE = 'onnxruntime'
DEPLOY_PROFILES.register(DeployProfile(
    DEFAULT_PROFILE, 'onnxruntime', conv_as_integer_matmul=True,
    bias_in_integer_kernel=True))
DEPLOY_PROFILES.register(DeployProfile(
    'onnxruntime-integer', 'onnxruntime', softmax='uniform',
    integer_target=True, conv_as_integer_matmul=True,
    bias_in_integer_kernel=True, per_tensor_activations=True))
DEPLOY_PROFILES.register(DeployProfile(
    'tensorrt', 'TensorRT INT8', symmetric=True, softmax='uniform',
    bits=(8, ), per_tensor_activations=True, residual_adds=True))
