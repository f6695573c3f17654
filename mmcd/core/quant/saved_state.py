"""A calibrated (and reconstructed) PTQ model saved and restored without
calibrating again. Pure PyTorch.

The saved state is the quantized model's ``state_dict``: the parameters
(the float ones, and those RepQ-ViT's reparameterization folded), every
quantizer's grid, per-channel shifts and AdaRound's rounding variables. It
does not hold the quantizers' on/off state or which weight quantizers are
AdaRound ones; :func:`restore_quantized` rebuilds both from the keys: a
model converted by :func:`~mmcd.core.quant.quantize_model` with the same
:class:`~mmcd.core.quant.QuantConfig` loads it strictly, and every
quantizer the state calibrated is switched on.
"""
from typing import Dict

import torch
from torch import nn

from .convert import fake_quantizers
from .reconstruction import AdaRoundQuantizer

ROUNDING_KEY = 'weight_quantizer.alpha'


def restore_quantized(model: nn.Module, state: Dict[str, torch.Tensor]
                      ) -> int:
    """Load ``state`` (a quantized model's ``state_dict``) into ``model``,
    converted with the same config and not calibrated: weight quantizers
    with saved rounding variables become hard :class:`AdaRoundQuantizer`\\ s,
    the load is strict, calibrated quantizers are switched on and the
    quantized weights cached. Returns the number of quantizers on."""
    for key in state:
        if not key.endswith(ROUNDING_KEY):
            continue
        layer = model.get_submodule(key[:-len(ROUNDING_KEY) - 1])
        layer.weight_quantizer = AdaRoundQuantizer.restored(
            layer.weight_quantizer, state[key].shape)
    model.load_state_dict(state, strict=True)
    count = 0
    for quantizer in fake_quantizers(model):
        if quantizer.calibrated:
            quantizer.set_state('quant')
            count += 1
    for layer in model.modules():
        if hasattr(layer, 'cache_weight') and \
                layer.weight_quantizer.calibrated:
            layer.cache_weight()
    return count
