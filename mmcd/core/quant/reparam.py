"""Scale reparameterization of post-LayerNorm activations (RepQ-ViT, Li et
al., ICCV 2023), with the DopQ-ViT MAD-guided target as an option.

Post-LayerNorm activations vary a lot between channels, so a per-tensor
quantizer wastes its grid; per-channel activation quantization is not
hardware friendly. RepQ-ViT calibrates per-channel parameters ``(s_c, z_c)``
of the LayerNorm output ``y`` and rewrites the network so that one per-tensor
``(s~, z~)`` quantizes the rewritten activation exactly as ``(s_c, z_c)``
quantized ``y``:

    r_c = s_c / s~,   t_c = s~ (z_c - z~)
    y'  = y / r + t                       (quantized per tensor with s~, z~)
    LN:  gamma' = gamma / r,  beta' = beta / r          (+ t, see below)
    next Linear:  W' = W diag(r)                        (- W (r t) in bias)

which is exactly equivalent in floating point. mmcd folds the scale part
``r`` into the LayerNorm and the next Linear, and keeps the shift ``t`` inside
the Linear's input quantizer (``x -> Q(x + t) - t``). The float function and
the quantization grid are the same as RepQ-ViT's; the reason is Swin's window
attention, which zero-pads the LayerNorm output before ``qkv``: with ``t``
folded into ``beta`` the padded zeros would no longer mean zero. In an integer
deployment ``t`` folds into ``beta`` and the bias as in RepQ-ViT (padding
with ``t``).

Target scale: RepQ-ViT uses ``s~ = mean(s_c)``, ``z~ = round(mean(z_c))``.
DopQ-ViT's MOSF replaces the mean, whose value outlier channels drag up, by a
MAD-guided choice; our formulation (DopQ's equations are not public to us):
the mean over the channels whose ``s_c`` is within 3 median absolute
deviations of the median (likewise for ``z_c``). Pure PyTorch.
"""
import re
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

#: (LayerNorm, next Linear) name patterns; ``{p}`` is the shared prefix.
REPARAM_RULES = (
    # mmdet Swin: attention, FFN, patch merging
    (r'(?P<p>.+)\.norm1', '{p}.attn.w_msa.qkv'),
    (r'(?P<p>.+)\.norm2', '{p}.ffn.layers.0.0'),
    (r'(?P<p>.+)\.downsample\.norm', '{p}.downsample.reduction'),
    # timm / mmpretrain / mmcd ViT blocks
    (r'(?P<p>.+)\.norm1', '{p}.attn.qkv'),
    (r'(?P<p>.+)\.norm2', '{p}.mlp.fc1'),
)


def find_norm_linear_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """(LayerNorm name, Linear name) pairs of ``model`` that the rules
    find."""
    modules = dict(model.named_modules())
    pairs = []
    for norm_pat, lin_tpl in REPARAM_RULES:
        for name, mod in modules.items():
            match = re.fullmatch(norm_pat, name)
            if match is None or not isinstance(mod, nn.LayerNorm):
                continue
            linear = lin_tpl.format(**match.groupdict())
            if isinstance(modules.get(linear), nn.Linear):
                pairs.append((name, linear))
    return pairs


def target_params(scale: torch.Tensor, zero: torch.Tensor,
                  target: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``(s~, z~)`` from per-channel ``(s_c, z_c)``: ``'mean'``
    (RepQ-ViT) or ``'mad'`` (DopQ-ViT-style robust mean)."""
    if target == 'mean':
        return scale.mean(), torch.round(zero.mean())
    if target != 'mad':
        raise ValueError(f"target must be 'mean' or 'mad', got {target!r}")

    def robust_mean(values):
        med = values.median()
        mad = (values - med).abs().median()
        keep = (values - med).abs() <= 3 * mad
        return values[keep].mean() if keep.any() else med

    return robust_mean(scale), torch.round(robust_mean(zero))


@torch.no_grad()
def reparameterize(norm: nn.LayerNorm, linear: nn.Module,
                   channel_min: torch.Tensor, channel_max: torch.Tensor,
                   target: str = 'mean') -> Dict[str, torch.Tensor]:
    """Fold RepQ-ViT's per-channel scales into ``norm`` and ``linear`` (in
    place) and give ``linear.input_quantizer`` the per-channel shift.

    ``linear`` is a :class:`~mmcd.core.quant.modules.QuantLinear`; its input
    quantizer's bit width defines the per-channel grids. Returns ``r`` and
    ``t``.
    """
    if norm.weight is None or norm.bias is None:
        raise ValueError('reparameterization needs an affine LayerNorm')
    quantizer = linear.input_quantizer
    scale_c, zero_c = quantizer.params_for_range(channel_min, channel_max)
    scale_t, zero_t = target_params(scale_c, zero_c, target)
    r = scale_c / scale_t
    t = scale_t * (zero_c - zero_t)
    norm.weight.div_(r)
    norm.bias.div_(r)
    linear.weight.mul_(r[None, :])
    quantizer.channel_offset = t.clone()
    return dict(r=r, t=t)


class ChannelRangeRecorder:
    """Per-channel min/max of the outputs of some modules (forward hooks),
    last dimension as channels."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.ranges = {}
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, inputs, output):
        flat = output.detach().reshape(-1, output.shape[-1])
        lo, hi = flat.amin(0), flat.amax(0)
        if module in self.ranges:
            old_lo, old_hi = self.ranges[module]
            lo, hi = torch.minimum(lo, old_lo), torch.maximum(hi, old_hi)
        self.ranges[module] = (lo, hi)

    def remove(self):
        for h in self.handles:
            h.remove()
