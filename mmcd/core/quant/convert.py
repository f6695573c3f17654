"""Turn a float model into a fake-quantized one and calibrate it.

What is quantized by default, as RepQ-ViT does on COCO: every ``Linear`` and
``Conv2d`` (weights per output channel, inputs per tensor) and both attention
matmuls, in backbone, neck and heads; the patch embedding's input at 8 bits.
``ConvTranspose2d``, norms, softmax and residual additions stay in floating
point. ``scope='backbone'`` restricts quantization to the backbone; ``skip``
patterns (regular expressions searched in module names) leave layers out.

Methods: ``minmax`` (baseline: min-max ranges, uniform post-softmax),
``repq-vit`` (LayerNorm scale reparameterization with mean target, quantile
MSE search for activations, MSE clipping for weights, log-sqrt2 post-softmax)
and ``dopq-vit`` (the same with the MAD-guided reparameterization target and
TanQ post-softmax). Pure PyTorch.
"""
import re
from dataclasses import dataclass, field
from typing import Callable, List, Sequence

import torch
from torch import nn

from .attention import ATTENTION_CONTAINERS, QUANT_ATTENTIONS
from .modules import MatMul, QuantConv2d, QuantLinear, QuantMatMul
from .quantizers import FakeQuantizer, check_bits
from .reparam import ChannelRangeRecorder, find_norm_linear_pairs, \
    reparameterize

METHODS = ('minmax', 'repq-vit', 'dopq-vit')
ATTENTION_NAME = re.compile(r'attention|msa', re.IGNORECASE)


@dataclass
class QuantConfig:
    """What to quantize and how.

    Args:
        w_bits, a_bits: 2..8.
        method: one of :data:`METHODS`.
        scope: ``'all'`` or ``'backbone'`` (modules under ``backbone.``).
        skip: regexes of module names left in floating point.
        first_layer_bits: input bits of modules matching
            ``first_layer_pattern`` (the patch embedding).
    """
    w_bits: int = 4
    a_bits: int = 4
    method: str = 'repq-vit'
    scope: str = 'all'
    skip: Sequence[str] = field(default_factory=tuple)
    first_layer_bits: int = 8
    first_layer_pattern: str = r'patch_embed'

    def __post_init__(self):
        check_bits(self.w_bits)
        check_bits(self.a_bits)
        check_bits(self.first_layer_bits)
        if self.method not in METHODS:
            raise ValueError(f'unknown quantization method {self.method!r}; '
                             f'known: {", ".join(METHODS)}')
        if self.scope not in ('all', 'backbone'):
            raise ValueError("scope must be 'all' or 'backbone', got "
                             f'{self.scope!r}')


def _in_scope(name: str, cfg: QuantConfig) -> bool:
    if cfg.scope == 'backbone' and not name.startswith('backbone.'):
        return False
    return not any(re.search(p, name) for p in cfg.skip)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def quantize_model(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Replace, in place, the layers of ``model`` by quantized ones (all
    quantizers start in the ``'fp'`` state: the output is unchanged).

    Raises ``ValueError`` on a model that is already quantized (quantizers
    never stack) and on attention modules mmcd cannot quantize.
    """
    if any(isinstance(m, FakeQuantizer) for m in model.modules()):
        raise ValueError('model is already quantized; quantize a float copy')
    for name, module in list(model.named_modules()):
        if not name or not _in_scope(name, cfg):
            continue
        kind = type(module).__name__
        if kind in QUANT_ATTENTIONS:
            _set_module(model, name, QUANT_ATTENTIONS[kind](
                module, cfg.a_bits, cfg.method))
        elif isinstance(module, MatMul):
            _set_module(model, name, QuantMatMul.for_role(
                module.role, cfg.a_bits, cfg.method))
        elif ATTENTION_NAME.search(kind) and kind not in \
                ATTENTION_CONTAINERS and not any(
                    isinstance(m, MatMul) for m in module.children()):
            raise ValueError(
                f'cannot quantize attention module {name} ({kind}): its '
                'matmuls are computed inline. Supported: attention written '
                'with mmcd.core.quant.MatMul, '
                f'{", ".join(sorted(QUANT_ATTENTIONS))} (containers: '
                f'{", ".join(sorted(ATTENTION_CONTAINERS))}); skip it with '
                f"skip=[r'{re.escape(name)}'] or scope='backbone'")
    for name, module in list(model.named_modules()):
        if not name or not _in_scope(name, cfg):
            continue
        a_bits = cfg.first_layer_bits if re.search(
            cfg.first_layer_pattern, name) else cfg.a_bits
        if isinstance(module, nn.Linear) and not isinstance(module,
                                                             QuantLinear):
            _set_module(model, name, QuantLinear.from_float(
                module, cfg.w_bits, a_bits, cfg.method))
        elif isinstance(module, nn.Conv2d) and not isinstance(
                module, QuantConv2d):
            _set_module(model, name, QuantConv2d.from_float(
                module, cfg.w_bits, a_bits, cfg.method))
    return model


def quantizers(model: nn.Module) -> List[FakeQuantizer]:
    return [m for m in model.modules() if isinstance(m, FakeQuantizer)]


def set_quant_state(model: nn.Module, state: str) -> None:
    for q in quantizers(model):
        q.set_state(state)


@torch.no_grad()
def calibrate(model: nn.Module, cfg: QuantConfig,
              run_calibration: Callable[[], None]) -> dict:
    """Calibrate a model converted by :func:`quantize_model` and switch it
    to quantized inference.

    ``run_calibration`` runs the model (in eval mode) on the calibration
    images; it is called twice for ``repq-vit`` / ``dopq-vit`` (per-channel
    LayerNorm ranges for the reparameterization, then the quantizers' own
    statistics) and once for ``minmax``. Returns a summary.
    """
    model.eval()
    reparam_pairs = []
    if cfg.method in ('repq-vit', 'dopq-vit'):
        modules = dict(model.named_modules())
        reparam_pairs = [(n, lin) for n, lin in find_norm_linear_pairs(model)
                         if isinstance(modules[lin], QuantLinear)]
        recorder = ChannelRangeRecorder([modules[n] for n, _ in
                                         reparam_pairs])
        try:
            run_calibration()
        finally:
            recorder.remove()
        target = 'mean' if cfg.method == 'repq-vit' else 'mad'
        for norm_name, lin_name in reparam_pairs:
            norm = modules[norm_name]
            if norm not in recorder.ranges:
                continue  # never executed on the calibration images
            reparameterize(norm, modules[lin_name], *recorder.ranges[norm],
                           target=target)
    # quantized Linear / Conv2d, and QAT's query-key products
    layers = [m for m in model.modules() if hasattr(m, 'finalize_weight')]
    act_quantizers = [q for q in quantizers(model)
                      if not any(q is m.weight_quantizer for m in layers)]
    for q in act_quantizers:
        q.set_state('calib')
    try:
        run_calibration()
    except BaseException:
        set_quant_state(model, 'fp')
        raise
    unused = []
    for q in act_quantizers:
        try:
            q.finalize()
        except RuntimeError:  # a layer the calibration never reached
            unused.append(q)
            q.set_state('fp')
            continue
        q.set_state('quant')
    for layer in layers:
        layer.finalize_weight()
    return dict(layers=len(layers), reparameterized=len(reparam_pairs),
                act_quantizers=len(act_quantizers),
                unreached_quantizers=len(unused))
