"""Quantized twins of MMDetection modules, registered by class in
:data:`mmcd.core.quant.QUANTIZED_MODULES` (the core cannot import mmdet):
Swin's ``WindowMSA`` computes ``q @ k^T`` and ``attn @ v`` inline and is
taken over by :class:`~mmcd.core.quant.QuantWindowMSA`. ``ShiftWindowMSA``
only wraps a ``WindowMSA`` and needs no twin; neither does mmcv's
``MultiheadAttention``, which wraps ``nn.MultiheadAttention`` (the core's
:class:`~mmcd.core.quant.QuantMultiheadAttention`). ``SwinBlock`` adds its
residuals inline and is taken over by :class:`~mmcd.core.quant.
QuantSwinBlock` where a deployment profile quantizes residual additions
(``tensorrt``; elsewhere it stays as it is).

mmcv's ``MultiScaleDeformableAttention`` (Deformable DETR, DINO,
Mask2Former's pixel decoder) samples its value map bilinearly at learned
offsets and sums with learned weights: a gather, not a matmul, so it stays
float, registered in :data:`mmcd.core.quant.FLOAT_ATTENTION_KERNELS`; its
value, offset, weight and output projections are Linears and are
quantized."""
from mmcv.ops import MultiScaleDeformableAttention
from mmdet.models.backbones.swin import SwinBlock, WindowMSA

from mmcd.core.quant import (FLOAT_ATTENTION_KERNELS, QUANTIZED_MODULES,
                             QuantSwinBlock, QuantWindowMSA)

QUANTIZED_MODULES.register(QuantWindowMSA.from_float, name=WindowMSA)
QUANTIZED_MODULES.register(QuantSwinBlock.from_float, name=SwinBlock)
FLOAT_ATTENTION_KERNELS.register(
    'deformable sampling of the value map (projections quantized)',
    name=MultiScaleDeformableAttention)
