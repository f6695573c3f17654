"""MMDetection's ``SwinTransformer``: ``SwinBlock.attn.w_msa`` (a
``WindowMSA`` inside a ``ShiftWindowMSA``, fused ``qkv``, ``proj``), mmcv's
``FFN`` (``ffn.layers.0.0`` -> ``ffn.layers.1``), ``norm1`` / ``norm2``
before attention and FFN, patch merging ``downsample.norm`` ->
``downsample.reduction``, ``patch_embed`` first."""
from ..pairs import PairRule, attention_rules
from . import ArchitectureSpec, register_architecture

SWIN_RULES = (
    PairRule('ffn', r'(?P<block>.+)\.ffn\.layers\.0\.0',
             '{block}.ffn.layers.1', name='{block}.ffn'),
    *attention_rules('attn.w_msa'),
)


def quant_window_msa(module, a_bits, method):
    """WindowMSA computes ``q k^T`` and ``attn v`` inline: take it over
    (imported here, at conversion time: the quant package imports the
    specs)."""
    from ..quant.attention import QuantWindowMSA
    return QuantWindowMSA(module, a_bits, method)


SWIN = register_architecture(ArchitectureSpec(
    name='swin',
    pair_rules=SWIN_RULES,
    reparam_rules=(
        (r'(?P<p>.+)\.norm1', '{p}.attn.w_msa.qkv'),
        (r'(?P<p>.+)\.norm2', '{p}.ffn.layers.0.0'),
        (r'(?P<p>.+)\.downsample\.norm', '{p}.downsample.reduction'),
    ),
    quant_attentions={'WindowMSA': quant_window_msa},
    attention_containers=frozenset({'ShiftWindowMSA'}),
    first_layer=r'patch_embed',
))
