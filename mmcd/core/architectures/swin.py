"""MMDetection's ``SwinTransformer``: ``SwinBlock.attn.w_msa`` (a
``WindowMSA`` inside a ``ShiftWindowMSA``, fused ``qkv``, ``proj``), mmcv's
``FFN`` (``ffn.layers.0.0`` -> ``ffn.layers.1``), ``norm1`` / ``norm2``
before attention and FFN, patch merging ``downsample.norm`` ->
``downsample.reduction``, ``patch_embed`` first. ``WindowMSA`` computes its
matmuls inline: its quantized twin (:class:`mmcd.core.quant.QuantWindowMSA`)
is registered by class where mmdet is imported (``mmcd.models``)."""
from ..pairs import MMCV_FFN_RULE, attention_rules
from . import ARCHITECTURES, ArchitectureSpec, MlpUnit

SWIN_RULES = (
    MMCV_FFN_RULE,
    *attention_rules('attn.w_msa'),
)


SWIN = ARCHITECTURES.register(ArchitectureSpec(
    name='swin',
    pair_rules=SWIN_RULES,
    reparam_rules=(
        (r'(?P<p>.+)\.norm1', '{p}.attn.w_msa.qkv'),
        (r'(?P<p>.+)\.norm2', '{p}.ffn.layers.0.0'),
        (r'(?P<p>.+)\.downsample\.norm', '{p}.downsample.reduction'),
    ),
    first_layer=r'patch_embed',
    reconstruction_units=(r'backbone\.patch_embed',
                          r'backbone\.stages\.\d+\.blocks\.\d+',
                          r'backbone\.stages\.\d+\.downsample', r'neck'),
    mlp_units=(MlpUnit(r'backbone\.stages\.\d+\.blocks\.\d+\.ffn',
                       fc1='layers.0.0', act='layers.0.1', fc2='layers.1'),),
))
