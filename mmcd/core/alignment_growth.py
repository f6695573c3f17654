"""Alignment growth: a *planted* model of the outlier mechanism CD targets.

CD's premise (:mod:`.colinearity`): for an ordered pair ``y = B act(A x)``,
rows of ``B`` colinear with the top left singular vectors of ``A`` amplify
the input along the matching right singular vectors, and that alignment is
where activation outliers come from. Real ImageNet-pretrained Swin/ViT
backbones grow it over long training; a CPU-sized toy trained for minutes
does not (docs/experiment). To test what CD buys where the mechanism
exists, this regularizer plants it: the CD update with the opposite sign,
after every real optimizer step::

    A <- A + eta * lam * B^T B A / ||B||_2^2
    B <- B + eta * lam * B A A^T / ||A||_2^2

(``eta`` the param group's lr, ``lam`` the strength; both right-hand sides
from the values before the update). Along a direction where ``B`` is fully
aligned with ``A`` this is weight *growth* at rate ``eta * lam`` per step,
so the product ``B A`` grows by about ``(1 + eta lam)^2`` per step along
its top directions while the directions ``B`` does not see stay put: the
alignment rises towards its rank-1 maximum and the activations along the
aligned directions grow. The task loss and the optimizer's weight decay
act against it; ``max_alignment`` stops the growth of a pair once its
mean alignment over heads has reached that value, so the planted
magnitude is set by the recipe rather than by how long it runs.

Use it only to make a model to study (a pretraining phase, then
fine-tuning without it): report results on such models as a planted model
of the mechanism, never as what training produces by itself. Pure PyTorch;
registered as ``alignment_growth`` (:mod:`.regularizers`).
"""
from typing import Dict, Optional

import torch

from .colinearity import (ColinearityDecay, ColinearityDecayRegularizer,
                          alignment)
from .regularizers import REGULARIZERS


@REGULARIZERS.register
class AlignmentGrowthRegularizer(ColinearityDecayRegularizer):
    """The CD update with the opposite sign (``alignment_growth``), on
    CD's schedule options (see :class:`ColinearityDecayRegularizer`).

    Args:
        strength: ``lam`` (>= 0, required): growth rate per unit lr.
        max_alignment: a pair whose mean alignment (over heads, see
            :func:`~mmcd.core.colinearity.alignment`) is at or above this
            value is left unchanged at that step (None: no cap). Random
            pairs score about 1, a rank-1 pair its inner dimension.
        **schedule: ``interval``, ``begin``, ``end``, ``warmup_iters``,
            ``power_iters``, ``cuda_graph`` as for ``cd``.

    Logs ``alignment_growth_update_norm``, ``alignment_growth_align_{kind}
    _mean`` / ``_max``, ``alignment_growth_capped_pairs`` and
    ``alignment_growth_skipped_pairs``.
    """
    name = 'alignment_growth'

    def __init__(self, strength: float,
                 max_alignment: Optional[float] = None, **schedule):
        super().__init__(strength, **schedule)
        if max_alignment is not None and not max_alignment > 0:
            raise ValueError('alignment_growth max_alignment must be > 0 or '
                             f'None, got {max_alignment}')
        self.max_alignment = max_alignment
        self._capped = torch.zeros(())

    def bind(self, model, pairs, lr_of) -> None:
        self.pairs = list(pairs)
        super().bind(model, pairs, lr_of)

    def after_step(self, iteration, optimizer_step):
        multiplier = self.multiplier(iteration, optimizer_step)
        if multiplier == 0:
            return {}
        growing = self.pairs
        if self.max_alignment is not None:
            with torch.no_grad():
                growing = [p for p in self.pairs
                           if float(alignment(*p.matrices()).mean()) <
                           self.max_alignment]
        self._capped = torch.tensor(len(self.pairs) - len(growing))
        if [p.name for p in growing] != [p.name for p in self.decay.pairs]:
            state = self.decay.state_dict()
            self.decay = ColinearityDecay(growing, self.strength,
                                          self.power_iters, self.cuda_graph)
            self.decay.load_state_dict(state)
        stats = self._last_stats = self.decay.step(self.lr_of, -multiplier)
        return self._logged(stats)

    def _logged(self, stats: Dict) -> Dict[str, torch.Tensor]:
        logged = super()._logged(stats)
        logged[f'{self.name}_capped_pairs'] = self._capped
        return logged
