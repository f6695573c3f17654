"""LayerNorm over the channels of an NCHW map (ViTDet's LN2d)."""
import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import nn


@MODELS.register_module()
class LN2d(nn.Module):
    """``y = (x - mean_c(x)) / sqrt(var_c(x) + eps) * w + b`` per pixel,
    statistics over the channel dimension of ``[N, C, H, W]``. Registered
    in MMEngine's root MODELS, so ``norm_cfg=dict(type='LN2d')`` works in
    configs and in mmcv's ``ConvModule`` whatever the default scope."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last layer_norm: one fused kernel instead of strided
        # reductions over dim 1
        return F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape,
                            self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)
