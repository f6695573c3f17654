"""Detection checkpoints of the Swin Transformer repository
(``SwinTransformer/Swin-Transformer-Object-Detection``, mmdet 2.11: the
Mask R-CNN and Cascade Mask R-CNN Swin models the PTQ papers quantize) for
MMDetection 3's ``SwinTransformer``.

The repository's backbone names its modules as the classification Swin does
(``layers.i.blocks.j.attn.qkv``, ``mlp.fc1``, ``patch_embed.proj``) and
concatenates the four 2x2 neighbours of its patch merging as ``(0,0), (1,0),
(0,1), (1,1)`` per channel block, where mmdet unfolds them channel by
channel; mmdet's own ``swin_converter`` maps both for a classification
checkpoint. :func:`convert_swin_detection_state` applies it to the
``backbone.`` part of a detection state dict and keeps every other key
(neck, RPN and RoI heads keep their names from mmdet 2 to 3)."""
from collections import OrderedDict
from typing import Dict

import torch
from mmdet.models.backbones.swin import swin_converter

BACKBONE = 'backbone.'


def convert_swin_detection_state(state: Dict[str, torch.Tensor]
                                 ) -> 'OrderedDict[str, torch.Tensor]':
    """``state`` (a Swin repository detection model's ``state_dict``) with
    its backbone in mmdet 3's names and patch-merging order; other keys
    unchanged. A state without ``backbone.layers.*`` keys (already mmdet's,
    or not a Swin detector) is an error naming what it found."""
    backbone = {k[len(BACKBONE):]: v for k, v in state.items()
                if k.startswith(BACKBONE)}
    if not any(k.startswith('layers.') for k in backbone):
        found = sorted({k.split('.')[0] for k in backbone}) or ['none']
        raise ValueError(
            'not a Swin repository detection checkpoint: no backbone.layers.* '
            f'keys (backbone parts found: {", ".join(found)}); an mmdet 3 '
            'checkpoint (backbone.stages.*) loads as it is')
    converted = OrderedDict(swin_converter(backbone))  # adds 'backbone.'
    for key, value in state.items():
        if not key.startswith(BACKBONE):
            converted[key] = value
    return converted
