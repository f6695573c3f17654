"""Plain ViT blocks of timm, mmpretrain and mmcd's ViTDet: ``attn.qkv``
(fused), ``attn.proj``, ``mlp.fc1`` -> ``mlp.fc2``, ``norm1`` / ``norm2``,
``patch_embed`` first; layer ids for layer-wise lr decay from
``backbone.blocks.<i>``. Attention written with
:class:`mmcd.core.quant.MatMul` (mmcd's ViTDet) needs no replacement."""
import re

from ..pairs import PairRule, attention_rules
from . import ARCHITECTURES, ArchitectureSpec, MlpUnit

VIT_RULES = (
    PairRule('ffn', r'(?P<block>.+)\.mlp\.fc1', '{block}.mlp.fc2',
             name='{block}.ffn'),
    *attention_rules('attn'),
)


def vit_num_layers(model) -> int:
    """``len(backbone.blocks) + 1``: the blocks and the embeddings."""
    blocks = getattr(getattr(model, 'backbone', None), 'blocks', None)
    if blocks is None:
        raise ValueError('the vit architecture needs a model with '
                         'backbone.blocks (a plain ViT) for layer-wise lr '
                         'decay')
    return len(blocks) + 1


def vit_layer_id(name: str, num_layers: int):
    """0 for the patch and position embeddings, ``i + 1`` for
    ``backbone.blocks.i``, ``num_layers`` for everything after the blocks
    (neck, heads)."""
    if name.startswith(('backbone.patch_embed', 'backbone.pos_embed')):
        return 0
    match = re.match(r'backbone\.blocks\.(\d+)\.', name)
    return int(match.group(1)) + 1 if match else num_layers


VIT = ARCHITECTURES.register(ArchitectureSpec(
    name='vit',
    pair_rules=VIT_RULES,
    reparam_rules=(
        (r'(?P<p>.+)\.norm1', '{p}.attn.qkv'),
        (r'(?P<p>.+)\.norm2', '{p}.mlp.fc1'),
    ),
    first_layer=r'patch_embed',
    reconstruction_units=(r'backbone\.patch_embed', r'backbone\.blocks\.\d+',
                          r'neck'),
    mlp_units=(MlpUnit(r'backbone\.blocks\.\d+\.mlp'),),
    num_layers=vit_num_layers,
    layer_id=vit_layer_id,
    no_decay_names=('pos_embed', 'rel_pos_h', 'rel_pos_w'),
))
