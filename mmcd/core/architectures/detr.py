"""The Transformer layers of MMDetection's query-based detectors (DETR,
Deformable DETR, DINO, Mask2Former): mmcv's ``MultiheadAttention`` wraps
``nn.MultiheadAttention`` as ``{layer}.self_attn.attn`` /
``{layer}.cross_attn.attn`` (fused Q/K/V rows in ``in_proj_weight``,
``out_proj``); mmcv's ``FFN`` is ``ffn.layers.0.0`` -> ``ffn.layers.1``
(:data:`~mmcd.core.pairs.MMCV_FFN_RULE`, the Swin spec's rule too: a
pair found twice is kept once). Multi-scale deformable attention has
separate value and output projections and no query-key product: it has no
pair here. The layers are post-norm and add positional embeddings before
the projections, so RepQ-ViT's LayerNorm -> Linear reparameterization has
nothing to act on."""
from ..pairs import MMCV_FFN_RULE, attention_rules
from . import ARCHITECTURES, ArchitectureSpec

DETR_RULES = (
    MMCV_FFN_RULE,
    # blocks named *_attn (self_attn, cross_attn): not a Swin or ViT
    # block's own `attn`
    *attention_rules('attn', qkv=None, proj='out_proj',
                     qkv_param='in_proj_weight', block=r'.+_attn'),
)

DETR = ARCHITECTURES.register(ArchitectureSpec(
    name='detr',
    pair_rules=DETR_RULES,
))
