"""Quantized twins of MMDetection modules, registered by class in
:data:`mmcd.core.quant.QUANTIZED_MODULES` (the core cannot import mmdet):
Swin's ``WindowMSA`` computes ``q @ k^T`` and ``attn @ v`` inline and is
taken over by :class:`~mmcd.core.quant.QuantWindowMSA`. ``ShiftWindowMSA``
only wraps a ``WindowMSA`` and needs no twin; neither does mmcv's
``MultiheadAttention``, which wraps ``nn.MultiheadAttention`` (the core's
:class:`~mmcd.core.quant.QuantMultiheadAttention`). ``SwinBlock`` adds its
residuals inline and is taken over by :class:`~mmcd.core.quant.
QuantSwinBlock` where a deployment profile quantizes residual additions
(``tensorrt``; elsewhere it stays as it is), and so is the ``FPN``, whose
top-down merges add inline (:class:`~mmcd.core.quant.QuantFPN`).

mmcv's ``MultiScaleDeformableAttention`` (Deformable DETR, DINO,
Mask2Former's pixel decoder) samples its value map bilinearly at learned
offsets and sums with learned weights: a gather, not a matmul, so it stays
float, registered in :data:`mmcd.core.quant.FLOAT_ATTENTION_KERNELS`; its
value, offset, weight and output projections are Linears and are
quantized."""
from mmcv.ops import MultiScaleDeformableAttention
from mmdet.models.backbones.swin import SwinBlock, WindowMSA
from mmdet.models.necks import FPN

from mmcd.core.quant import (FLOAT_ATTENTION_KERNELS, QUANTIZED_MODULES,
                             QuantFPN, QuantSwinBlock, QuantWindowMSA)

QUANTIZED_MODULES.register(QuantWindowMSA.from_float, name=WindowMSA)
QUANTIZED_MODULES.register(QuantSwinBlock.from_float, name=SwinBlock)


def fpn_twin(fpn: FPN, w_bits: int, a_bits: int, method):
    """:class:`~mmcd.core.quant.QuantFPN` for mmdet's ``FPN``; a subclass
    with a forward of its own (``PAFPN``'s bottom-up path) computes another
    function and is left as it is (its convolutions are converted, its
    additions stay float)."""
    if type(fpn).forward is not FPN.forward:
        return fpn
    return QuantFPN.from_float(fpn, w_bits, a_bits, method)


QUANTIZED_MODULES.register(fpn_twin, name=FPN)
FLOAT_ATTENTION_KERNELS.register(
    'deformable sampling of the value map (projections quantized)',
    name=MultiScaleDeformableAttention)
