"""Quantization-aware training (QAT): LSQ, and OFQ (Liu et al., "Oscillation-
free Quantization for Low-bit Vision Transformers", ICML 2023). Pure PyTorch.

A model is prepared in two steps, so that a QAT checkpoint loads into a
prepared model before anything is calibrated (resume, testing):

1. :func:`prepare_qat` converts it as PTQ does (:func:`quantize_model`:
   same layers, same attention handling), then swaps in trainable
   quantizers (qat_quantizers.py): LSQ+ for every per-tensor activation, LSQ
   (``method='lsq'``) or StatsQ (``method='ofq'``) for weights; post-softmax
   log-sqrt2 / TanQ quantizers stay (fixed grids, straight-through
   gradients); with ``qk_reparam`` attention logits come from the quantized
   ``W_Q^T W_K`` (qk_reparam.py). Everything starts in the ``'fp'`` state.
2. :func:`initialize_qat` runs the PTQ calibration of ``QATConfig.init``
   (RepQ-ViT by default: LayerNorm reparameterization, activation ranges),
   which initialises the learnable steps and offsets, and switches the
   quantizers on.

Confidence-guided annealing (OFQ's CGA): from a chosen point late in
training, **at every iteration** :func:`freeze_confident_weights` decides
anew which quantized weights are confident, i.e. at least
``boundary_range`` steps (default 0.005) away from their nearest rounding
boundary (``boundary_distance``), and freezes them at their current value
for that iteration; only the weights near a boundary, the ones that can
still flip level (oscillate), train. A weight that moves out of the range
is frozen from the next iteration on; a frozen one whose distance shrinks
(StatsQ's step follows the other weights) is released.
As in OFQ's training loop, a frozen weight's gradient is zeroed before the
optimizer sees it (:func:`mask_frozen_gradients`: gradient clipping's norm
and AdamW's moments see a zero), and :func:`restore_frozen_weights`, after
every optimizer (and CD) update, writes the frozen values back, which
freezes them exactly whatever the optimizer (momentum, weight decay and CD
would otherwise move them).
Under query-key reparameterization the ``W_Q`` / ``W_K`` rows of a qkv layer
are quantized only through the product ``W_Q^T W_K``, never by the qkv
layer's weight quantizer, so they are never frozen by it (they train, as in
OFQ). The masks are computed on the device without host synchronisation.

:class:`OscillationTracker` measures oscillation: the fraction of quantized
weights whose integer level changed at least once over a window of steps.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .convert import QuantConfig, calibrate, fake_quantizers, quantize_model
from .modules import QuantConv2d, QuantLinear
from .qat_quantizers import (QAT_ACT_QUANTIZERS, QAT_WEIGHT_QUANTIZERS,
                             TrainableWeightQuantizer)
from .qk_reparam import QKReparam
from .quantizers import FakeQuantizer


@dataclass(frozen=True)
class QATMethod:
    """A QAT method: its trainable weight quantizer (a name of
    :data:`~mmcd.core.quant.qat_quantizers.QAT_WEIGHT_QUANTIZERS`;
    activations get their registered QAT counterparts, LSQ+), and its
    defaults for query-key reparameterization and confidence-guided
    annealing (``cga``: options or None). ``QAT_METHODS.register(...)``
    adds one."""
    name: str
    weight_quantizer: str
    qk_reparam: bool = False
    cga: Optional[Dict] = None

    def __post_init__(self):
        try:
            QAT_WEIGHT_QUANTIZERS.get(self.weight_quantizer)
        except ValueError as err:
            raise ValueError(f'{self.name}: weight_quantizer: {err}') \
                from None

    def make_weight_quantizer(self, bits: int, channels: int):
        return QAT_WEIGHT_QUANTIZERS.get(self.weight_quantizer)(bits,
                                                                channels)


#: QAT methods by name.
QAT_METHODS = Registry('QAT method')


def get_qat_method(name: str) -> QATMethod:
    return QAT_METHODS.get(name)


#: LSQ (Esser et al., ICLR 2020): learned steps for weights and activations
QAT_METHODS.register(QATMethod('lsq', 'lsq'))
#: OFQ (Liu et al., ICML 2023): StatsQ weights, query-key
#: reparameterization, CGA over the last 10% of training
QAT_METHODS.register(QATMethod('ofq', 'statsq', qk_reparam=True,
                               cga=dict(begin=0.9)))


@dataclass
class QATConfig:
    """What QAT quantizes and how.

    Args:
        w_bits, a_bits: 2..8.
        method: a registered QAT method (:class:`QATMethod`): ``'lsq'``
            (LSQ weights and LSQ+ activations) or ``'ofq'`` (StatsQ weights,
            LSQ+ activations, query-key reparameterization, CGA).
        init: the PTQ method whose calibration initialises the quantizers
            (``'minmax'``, ``'repq-vit'`` or ``'dopq-vit'``).
        qk_reparam: quantize ``W_Q^T W_K`` per head (default: the method's,
            on for ``'ofq'``).
        scope, skip, first_layer_bits: as in :class:`QuantConfig`.
    """
    w_bits: int = 4
    a_bits: int = 4
    method: str = 'ofq'
    init: str = 'repq-vit'
    qk_reparam: Optional[bool] = None
    scope: str = 'all'
    skip: Sequence[str] = field(default_factory=tuple)
    first_layer_bits: int = 8

    def __post_init__(self):
        if self.qk_reparam is None:
            self.qk_reparam = self.qat_method.qk_reparam
        self.ptq_config()  # validates bits, init method, scope

    @property
    def qat_method(self) -> QATMethod:
        return get_qat_method(self.method)

    @property
    def weight_quantizer(self) -> str:
        return self.qat_method.weight_quantizer

    def ptq_config(self) -> QuantConfig:
        return QuantConfig(self.w_bits, self.a_bits, self.init, self.scope,
                           tuple(self.skip), self.first_layer_bits)


def _swap_act_quantizers(model: nn.Module) -> int:
    """The registered QAT counterpart (:data:`~mmcd.core.quant.
    qat_quantizers.QAT_ACT_QUANTIZERS`) in place of every activation
    quantizer; weight quantizers are trainable ones by now. A quantizer
    kind without a counterpart is an error, never left as it is."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, FakeQuantizer) or child.trainable:
                continue
            counterpart = QAT_ACT_QUANTIZERS.find(child)
            if counterpart is None:
                raise ValueError(
                    f'{child.layer_name or name}: no QAT counterpart is '
                    f'registered for {type(child).__name__}; register one in '
                    'mmcd.core.quant.qat_quantizers.QAT_ACT_QUANTIZERS '
                    f'(registered: {", ".join(QAT_ACT_QUANTIZERS.names())})')
            replacement = counterpart(child)
            if replacement is not child:
                setattr(module, name, replacement)
                count += 1
    return count


def prepare_qat(model: nn.Module, cfg: QATConfig) -> Dict[str, int]:
    """Convert ``model`` in place for QAT (all quantizers off until
    :func:`initialize_qat`). Returns counts of what was converted."""
    quantize_model(model, cfg.ptq_config())
    layers = [m for m in model.modules()
              if isinstance(m, (QuantLinear, QuantConv2d))]
    for layer in layers:
        layer.weight_quantizer = cfg.qat_method.make_weight_quantizer(
            cfg.w_bits, layer.weight.shape[0])
    attentions = 0
    if cfg.qk_reparam:
        for module in model.modules():
            if hasattr(module, 'qk_reparam') and hasattr(module, 'qkv'):
                channels = module.qkv.in_features
                module.qk_reparam = QKReparam(
                    module.qkv, module.num_heads,
                    cfg.qat_method.make_weight_quantizer(
                        cfg.w_bits, module.num_heads * channels))
                attentions += 1
        if not attentions:
            raise ValueError(
                'qk_reparam=True but no attention in the quantized part of '
                'the model supports query-key reparameterization (mmcd '
                "ViTDet and Swin WindowMSA do); set qk_reparam=False")
    acts = _swap_act_quantizers(model)
    return dict(layers=len(layers), act_quantizers=acts,
                qk_reparam=attentions)


def trainable_weight_layers(model: nn.Module) -> List[nn.Module]:
    """Modules whose weight has a trainable quantizer: quantized Linear /
    Conv2d layers and query-key products."""
    return [m for m in model.modules()
            if isinstance(getattr(m, 'weight_quantizer', None),
                          TrainableWeightQuantizer)]


def initialize_qat(model: nn.Module, cfg: QATConfig,
                   run_calibration: Callable[[], None]) -> dict:
    """Calibrate a model prepared by :func:`prepare_qat` (initialising
    steps and offsets) and switch quantization on. Returns
    :func:`calibrate`'s summary."""
    if not trainable_weight_layers(model):
        raise ValueError('model is not prepared for QAT: run prepare_qat '
                         'first')
    return calibrate(model, cfg.ptq_config(), run_calibration)


def activate_qat(model: nn.Module) -> int:
    """Switch on every calibrated quantizer of a QAT model (after loading a
    QAT checkpoint, where the on/off state is not stored). Raises if the
    model has no calibrated QAT quantizer."""
    layers = trainable_weight_layers(model)
    if not layers:
        raise ValueError('model is not prepared for QAT: run prepare_qat '
                         'first')
    if not any(m.weight_quantizer.calibrated for m in layers):
        raise ConfigError(
            'the QAT model is not calibrated: its weights come from a '
            'float checkpoint (or none). Train it with QAT first '
            '(QuantAwareTrainingHook calibrates before training), or '
            'evaluate a float checkpoint with PostTrainingQuantHook')
    on = 0
    for q in fake_quantizers(model):
        if q.calibrated:
            q.set_state('quant')
            on += 1
    return on


def _weight_of(module: nn.Module) -> torch.Tensor:
    return module.product() if isinstance(module, QKReparam) \
        else module.weight


def _reparameterized_rows(model: nn.Module) -> Dict[int, int]:
    """``id(qkv layer) -> number of leading rows (W_Q, W_K)`` that the
    forward pass quantizes only through a query-key product."""
    return {id(m.qkv): 2 * m.qkv.in_features for m in model.modules()
            if isinstance(getattr(m, 'qk_reparam', None), QKReparam)}


@torch.no_grad()
def freeze_confident_weights(model: nn.Module,
                             boundary_range: float = 0.005) -> Dict:
    """CGA, one iteration: freeze (for this iteration's update) the
    quantized Linear / Conv2d weights at least ``boundary_range`` steps
    from a rounding boundary (module docstring). Query-key products are not
    parameters and are left out, and so are the ``W_Q`` / ``W_K`` rows they
    quantize. Returns ``frozen`` (a 0-dim tensor on the weights' device:
    reading it is the only host synchronisation) and ``total``."""
    if not 0 < boundary_range < 0.5:
        raise ValueError('boundary_range must be in (0, 0.5) (steps), got '
                         f'{boundary_range}')
    layers = [m for m in trainable_weight_layers(model)
              if not isinstance(m, QKReparam)]
    if not layers:
        raise ValueError(
            'confidence-guided annealing needs a QAT model (prepare_qat + '
            'initialize_qat): no quantized weight with a QAT quantizer')
    only_through_product = _reparameterized_rows(model)
    frozen, total = None, 0
    for layer in layers:
        quantizer = layer.weight_quantizer
        if not quantizer.calibrated:
            raise RuntimeError('confidence-guided annealing on a QAT model '
                               'that is not calibrated')
        mask = quantizer.boundary_distance(layer.weight) >= boundary_range
        mask[:only_through_product.get(id(layer), 0)] = False
        quantizer.frozen_mask = mask
        quantizer.frozen_value = layer.weight.detach().clone()
        count = mask.sum()
        frozen = count if frozen is None else frozen + count.to(frozen)
        total += mask.numel()
    return dict(frozen=frozen, total=total)


def mask_frozen_gradients(model: nn.Module) -> List:
    """Zero, as each backward pass accumulates it, the gradient of every
    weight CGA froze for the iteration (the masks
    :func:`freeze_confident_weights` sets; none before it runs). A hook on
    each quantized weight, run where the gradient is accumulated, so that
    gradient accumulation, AMP's unscaling, clipping, the optimizer and a
    DDP all-reduce (whose hooks run after it) all see the zeros. Returns
    the hook handles (``handle.remove()`` undoes it)."""
    def zero_frozen(quantizer, rows):
        def hook(param):
            if quantizer.frozen_mask.numel() and param.grad is not None:
                param.grad[rows].masked_fill_(quantizer.frozen_mask, 0)
        return hook

    handles = []
    for layer in trainable_weight_layers(model):
        if isinstance(layer, QKReparam):
            continue
        # the leaf parameter and the weight's rows in it (a FusedRowsLinear
        # reads rows of its owner's fused parameter)
        param, rows = layer.weight_source() if hasattr(
            layer, 'weight_source') else (layer.weight, slice(None))
        hook = zero_frozen(layer.weight_quantizer, rows)
        handles.append(param.register_post_accumulate_grad_hook(hook))
    return handles


@torch.no_grad()
def restore_frozen_weights(model: nn.Module) -> None:
    """Write the CGA-frozen weights back (after an optimizer update)."""
    for layer in trainable_weight_layers(model):
        quantizer = layer.weight_quantizer
        if quantizer.frozen_mask.numel():
            layer.weight.copy_(torch.where(quantizer.frozen_mask,
                                           quantizer.frozen_value,
                                           layer.weight))


class OscillationTracker:
    """Fraction of quantized weights whose integer level changed at least
    once since the last :meth:`pop_fraction` (call :meth:`update` after
    every optimizer step)."""

    def __init__(self, model: nn.Module):
        self.layers = trainable_weight_layers(model)
        if not self.layers:
            raise ValueError('no QAT weight quantizer to track')
        self.codes = self._codes()
        self.flipped = [torch.zeros_like(c, dtype=torch.bool)
                        for c in self.codes]
        self.steps = 0  # updates in the current window

    def _codes(self):
        return [m.weight_quantizer.codes(_weight_of(m)) for m in self.layers]

    def update(self) -> None:
        codes = self._codes()
        for flipped, old, new in zip(self.flipped, self.codes, codes):
            flipped |= old != new
        self.codes = codes
        self.steps += 1

    def pop_fraction(self) -> float:
        """The fraction since the last call, and a new window."""
        flips = sum(int(f.sum()) for f in self.flipped)
        total = sum(f.numel() for f in self.flipped)
        for f in self.flipped:
            f.zero_()
        self.steps = 0
        return flips / total
