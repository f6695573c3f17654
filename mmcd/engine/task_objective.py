"""The detection objective whose sensitivity APHQ-ViT's reconstruction loss
weights a unit's error by (:mod:`mmcd.core.quant.reconstruction_losses`).

Written from APHQ-ViT's public detection code (GoatWu/APHQ-ViT,
``tools/quant_utils/block_recon.py``, ``init_block_raw_grad``): the float
detector's RPN outputs on the reconstruction images are the reference; for
a (perturbed) forward pass, per image ``i``,

    L_i = C_i / sg(C_i) + B_i / sg(B_i),
    C_i = sum_levels KL(sigmoid(s_i) || sigmoid(s_i^ref)),
    B_i = sum_levels smooth_l1(d_i * m_i, d_i^ref * m_i),

with the element-wise binary KL (both probabilities clamped to
``[1e-7, 1 - 1e-7]``, averaged over the map), ``m_i`` the anchors whose
reference objectness exceeds 0.7 (over their 4 box deltas),
``smooth_l1`` torch's (beta 1, averaged over the map) and ``sg`` stop
gradient; ``L = sum_i L_i`` (a term that is exactly 0, e.g. ``B_i`` of an
image without a confident anchor, is left out rather than divided by
zero). Only two-stage detectors have an RPN; for the others the ``aph``
loss is refused with a one-line error.
"""
from typing import Callable

import torch
import torch.nn.functional as F

from mmcd.core import ConfigError

#: the reference objectness above which an anchor's box deltas count
CONFIDENT = 0.7


def binary_kl(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean element-wise ``KL(target || pred)`` of Bernoulli
    probabilities, both clamped to ``[1e-7, 1 - 1e-7]``."""
    p = pred.clamp(1e-7, 1 - 1e-7)
    t = target.clamp(1e-7, 1 - 1e-7)
    return (t * (t.log() - p.log()) +
            (1 - t) * ((1 - t).log() - (1 - p).log())).mean()


def require_rpn(model) -> None:
    """Fail in one line when ``model`` has no RPN to weight units by."""
    if getattr(model, 'rpn_head', None) is None:
        raise ConfigError(
            "the 'aph' reconstruction loss (aphq-vit) weights units by the "
            'RPN objective of a two-stage detector, and '
            f'{type(model).__name__} has no rpn_head; use '
            "reconstruction=dict(loss='lp') (or the qdrop method)")


def rpn_objective(float_model, images: torch.Tensor
                  ) -> Callable[[torch.nn.Module], torch.Tensor]:
    """``L`` of the module docstring on the preprocessed ``images``, as a
    function of the (float) detector it runs."""
    require_rpn(float_model)
    with torch.no_grad():
        scores, deltas = float_model.rpn_head(
            float_model.extract_feat(images))
    ref_probs = [s.sigmoid() for s in scores]
    ref_deltas = list(deltas)

    def objective(model) -> torch.Tensor:
        scores, deltas = model.rpn_head(model.extract_feat(images))
        total = 0
        for i in range(images.shape[0]):
            for term in rpn_terms(scores, deltas, ref_probs, ref_deltas, i):
                if float(term) > 0:
                    total = total + term / term.detach()
        return total

    return objective


def rpn_terms(scores, deltas, ref_probs, ref_deltas, i: int):
    """``(C_i, B_i)`` of the module docstring for image ``i``: the RPN's
    class logits and box deltas per level (``[N, A, H, W]``,
    ``[N, 4A, H, W]``) against the reference probabilities and deltas."""
    cls = sum(binary_kl(s[i].sigmoid(), r[i])
              for s, r in zip(scores, ref_probs))
    box = sum(F.smooth_l1_loss(
        d[i] * (r[i] > CONFIDENT).repeat_interleave(4, dim=0),
        rd[i] * (r[i] > CONFIDENT).repeat_interleave(4, dim=0))
        for d, r, rd in zip(deltas, ref_probs, ref_deltas))
    return cls, box
