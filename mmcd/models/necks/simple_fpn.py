"""ViTDet's simple feature pyramid: strides 4/8/16/32 (and 64) from the
single stride-16 map of a plain ViT."""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import nn

from ..layers import LN2d


@MODELS.register_module()
class SimpleFPN(BaseModule):
    """Scales the stride-16 map by 4 (two 2x2 deconvolutions with LN2d and
    GELU between), 2 (one deconvolution), 1 and 1/2 (2x2 max pooling); each
    level then gets a 1x1 and a 3x3 convolution with LN2d. With
    ``num_outs=5`` a stride-64 level is added by subsampling the last one
    (for the RPN's largest anchors).

    Args:
        in_channels: channels of the backbone map (768 for ViT-B).
        out_channels: channels of every output level (256).
        num_outs: 4 or 5.
    """

    def __init__(self, in_channels: int, out_channels: int,
                 num_outs: int = 5, norm_cfg: dict = dict(type='LN2d'),
                 init_cfg=None):
        super().__init__(init_cfg)
        if num_outs not in (4, 5):
            raise ValueError(f'num_outs must be 4 or 5, got {num_outs}')
        half, quarter = in_channels // 2, in_channels // 4
        self.num_outs = num_outs
        self.rescales = nn.ModuleList([
            nn.Sequential(
                nn.ConvTranspose2d(in_channels, half, 2, 2), LN2d(half),
                nn.GELU(), nn.ConvTranspose2d(half, quarter, 2, 2)),
            nn.ConvTranspose2d(in_channels, half, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2, 2),
        ])
        level_channels: Sequence[int] = (quarter, half, in_channels,
                                         in_channels)
        self.lateral_convs = nn.ModuleList(
            ConvModule(c, out_channels, 1, norm_cfg=norm_cfg, act_cfg=None)
            for c in level_channels)
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1,
                       norm_cfg=norm_cfg, act_cfg=None)
            for _ in level_channels)

    def forward(self, inputs: Tuple[torch.Tensor]) -> Tuple[torch.Tensor]:
        x = inputs[0]
        outs = [fpn(lat(rescale(x))) for rescale, lat, fpn in zip(
            self.rescales, self.lateral_convs, self.fpn_convs)]
        if self.num_outs == 5:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)
