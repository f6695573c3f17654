"""Scale reparameterization of post-LayerNorm activations (RepQ-ViT, Li et
al., ICCV 2023).

Post-LayerNorm activations vary a lot between channels, so a per-tensor
quantizer wastes its grid; per-channel activation quantization is not
hardware friendly. RepQ-ViT calibrates per-channel parameters ``(s_c, z_c)``
of the LayerNorm output ``y`` (the quantile/MSE search of quantizers.py, per
channel, during the calibration pass), picks a per-tensor target
``(s~, z~)`` and rewrites the network so that ``(s~, z~)`` quantizes the
rewritten activation exactly as ``(s_c, z_c)`` quantized ``y``:

    r_c = s_c / s~,   t_c = s~ (z_c - z~)
    y'  = y / r + t                       (quantized per tensor with s~, z~)
    LN:  gamma' = gamma / r,  beta' = beta / r          (+ t, see below)
    next Linear:  W' = W diag(r)                        (- W (r t) in bias)

which is exactly equivalent in floating point. The target is kept as the
quantizer's grid (not searched again: a re-search would undo the choice of
target), and the next Linear's weight is quantized again after the fold.
mmcd folds the scale part ``r`` into the LayerNorm and the next Linear, and
keeps the shift ``t`` inside the Linear's input quantizer
(``x -> Q(x + t) - t``), and the Linear adds ``(W_q - W) t`` to its bias
(:meth:`~mmcd.core.quant.modules.QuantLinear.shift_corrected_bias`), so the
float function, the quantization grid and the quantized function are
RepQ-ViT's (``W_q Q(x + t) + b - W t``); a padded token gives ``W_q Q(t) -
W t + b``, about the ``b`` of a zero input. The reason to keep ``t`` out of
``beta`` is Swin's window attention, which zero-pads the
LayerNorm output before ``qkv``: with ``t`` folded into ``beta`` the padded
zeros would no longer mean zero. In an integer deployment ``t`` folds into
``beta`` and the bias as in RepQ-ViT (padding with ``t``). For the same
reason the per-channel clip ranges are extended to include 0 (RepQ-ViT's
quantile range may exclude it): otherwise a padded zero of a channel whose
calibration values were all positive would be quantized to that channel's
minimum.

The target is RepQ-ViT's (its code): ``s~ = mean(s_c)``, ``z~ = mean(z_c)``,
the latter not rounded. Channel ``c`` is then quantized as ``round(y/s_c +
z_c - z~) + z~``: its rounding grid moves by the fractional part of ``z~``
against the per-channel quantizer's ``round(y/s_c) + z_c``, and the
fractional zero point has no integer (QuantizeLinear) form. With
``integer=True`` (:func:`target_params`; the ``onnxruntime-integer``
deployment profile sets it) ``z~`` is rounded: ``z_c - z~`` is an integer,
so every channel's codes are exactly its per-channel quantizer's (the
equivalence RepQ-ViT's paper states; tested), and the target exports as
``QuantizeLinear`` with an integer zero point.

Why mmcd has no separate MOSF target (DopQ-ViT's "MAD-guided optimal
scaling factor"; its equations are not public to us): under this
reparameterization the target scale cancels. Channel ``c`` is quantized as
``round(y'/s~) + z~ = round(y/s_c + z_c - z~) + z~``, the grid of ``s_c``
whatever ``s~`` is, and ``W' = W diag(s_c) / s~`` changes only by a uniform
factor that the per-output-channel weight search absorbs; ``z~`` acts only
through its fractional part. Choosing ``s~`` robustly (e.g. the mean of the
channels within 3 MADs of the median) therefore computes RepQ-ViT's function
(tested: a 7.3x target gives the same quantized outputs). The reading that
acts, bounding each ``s_c`` to the median +- 3 MADs, clips the outlier
channels: measured output MSE x33 on a LayerNorm with 3 of 32 channels 30x
wider (W4A4), -0.8 dB layer SQNR at W6A6 on the demo checkpoint; it is not
offered. docs/en/quantization.md has the measurements. Pure PyTorch.
"""
import re
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..architectures import reparam_rules


def find_norm_linear_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """(LayerNorm name, Linear name) pairs of ``model`` that the
    architecture specs' reparameterization rules find
    (:mod:`mmcd.core.architectures`). A LayerNorm a rule matches whose
    next module exists but is not an ``nn.Linear`` (e.g. an
    ``nn.MultiheadAttention``, whose projection is a parameter) is named in
    a warning and left without reparameterization; a missing one is a rule
    of another family (every registered family's rules are tried)."""
    modules = dict(model.named_modules())
    pairs = []
    for norm_pat, lin_tpl in reparam_rules():
        for name, mod in modules.items():
            match = re.fullmatch(norm_pat, name)
            if match is None or not isinstance(mod, nn.LayerNorm):
                continue
            linear = lin_tpl.format(**match.groupdict())
            target = modules.get(linear)
            if isinstance(target, nn.Linear):
                pairs.append((name, linear))
            elif target is not None:
                warnings.warn(
                    f'{name} matches the reparameterization rule '
                    f'{norm_pat!r}, but {linear} is a '
                    f'{type(target).__name__}, not an nn.Linear: its input '
                    'is quantized per tensor, without RepQ-ViT\'s '
                    'reparameterization')
    return pairs


def target_params(scale: torch.Tensor, zero: torch.Tensor,
                  integer: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT's per-tensor target ``(mean(s_c), mean(z_c))``;
    ``integer``: the zero point rounded (module docstring)."""
    zero_t = zero.mean()
    return scale.mean(), zero_t.round() if integer else zero_t


@torch.no_grad()
def reparameterize(
        norm: nn.LayerNorm, linear: nn.Module, scale_c: torch.Tensor,
        zero_c: torch.Tensor,
        target: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
) -> Dict[str, torch.Tensor]:
    """Fold RepQ-ViT's per-channel scales ``scale_c`` (with zero points
    ``zero_c``) into ``norm`` and ``linear`` (in place) and give
    ``linear.input_quantizer`` the target grid and the per-channel shift,
    quantization on.

    ``linear`` is a :class:`~mmcd.core.quant.modules.QuantLinear`;
    ``target`` a per-tensor ``(s~, z~)``, by default :func:`target_params`.
    Returns ``r``, ``t`` and the target.
    """
    if norm.weight is None or norm.bias is None:
        raise ValueError('reparameterization needs an affine LayerNorm')
    scale_t, zero_t = target or target_params(scale_c, zero_c)
    r = scale_c / scale_t
    t = scale_t * (zero_c - zero_t)
    norm.weight.div_(r)
    norm.bias.div_(r)
    linear.weight.mul_(r[None, :])
    # symmetric grids (zero points all 2^(b-1)) have no shift to keep
    linear.input_quantizer.set_params(scale_t, zero_t,
                                      channel_offset=t if t.any() else None)
    return dict(r=r, t=t, scale=scale_t, zero=zero_t)
