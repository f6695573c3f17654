"""Quantized twins of MMDetection modules, registered by class in
:data:`mmcd.core.quant.QUANTIZED_MODULES` (the core cannot import mmdet):
Swin's ``WindowMSA`` computes ``q @ k^T`` and ``attn @ v`` inline and is
taken over by :class:`~mmcd.core.quant.QuantWindowMSA`. ``ShiftWindowMSA``
only wraps a ``WindowMSA`` and needs no twin."""
from mmdet.models.backbones.swin import WindowMSA

from mmcd.core.quant import QUANTIZED_MODULES, QuantWindowMSA

QUANTIZED_MODULES.register(QuantWindowMSA.from_float, name=WindowMSA)
