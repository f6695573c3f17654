"""Alignment growth: a *planted* model of the outlier mechanism CD targets.

CD's premise (:mod:`.colinearity`): for an ordered pair ``y = B act(A x)``,
rows of ``B`` colinear with the top left singular vectors of ``A`` amplify
the input along the matching right singular vectors, and that alignment is
where activation outliers come from. Real ImageNet-pretrained Swin/ViT
backbones grow it over long training; a CPU-sized toy trained for minutes
does not (docs/experiment). To test what CD buys where the mechanism
exists, this regularizer plants it: the CD update with the opposite sign,
after every real optimizer step::

    A <- A + eta * lam * M (B^T B A) / ||B||_2^2
    B <- B + eta * lam * (B A A^T) M / ||A||_2^2

(``eta`` the param group's lr, ``lam`` the strength, right-hand sides from
the values before the update, per head for attention pairs). ``M`` is the
identity, or with ``channels=k`` the diagonal 0/1 mask of the ``k`` inner
channels ``j`` (hidden units of an FFN, dimensions of a head) with the
largest ``||a_j|| ||b_j||`` (row ``j`` of ``A`` times column ``j`` of
``B``): the growth then runs through those channels only.

Why the mask: without it the growth is basis-free, so ``B A`` grows along
its top singular directions, which are spread over all channels, and the
activations grow everywhere alike. Measured on the toy detector (256
iterations at strength 16 from a pretraining checkpoint; 8 val images):
largest activation 25994 against 54 without growth, but the largest
kurtosis *fell*, 9.4 against 37.5; with ``channels=2``: 2144 and kurtosis
1243 (docs/experiment/planted.md). The outliers of real transformers sit in
a handful of channels (Dettmers et al., LLM.int8(), 2022; Bondarenko et al.,
"Quantizable Transformers", 2023), which is what breaks per-tensor
activation quantizers; ``channels`` plants the same alignment in a few
channels, so the largest values concentrate there.

Along a direction where ``B`` is fully aligned with ``A`` this is weight
*growth* at rate ``eta * lam`` per step, so the product grows by about
``(1 + eta lam)^2`` per step along it. The task loss and the optimizer's
weight decay act against it; ``max_alignment`` stops the growth of a pair
once its mean alignment over heads has reached that value, so the planted
magnitude is set by the recipe rather than by how long it runs.

Use it only to make a model to study (a pretraining phase, then
fine-tuning without it): report results on such models as a planted model
of the mechanism, never as what training produces by itself. Pure PyTorch;
registered as ``alignment_growth`` (:mod:`.regularizers`).
"""
import math
from typing import Dict, Optional

import torch

from .colinearity import (ColinearityDecayRegularizer, SpectralNormEstimator,
                          alignment, colinearity_decay_deltas)
from .regularizers import REGULARIZERS


def top_channel_mask(a: torch.Tensor, b: torch.Tensor,
                     channels: int) -> torch.Tensor:
    """``[H, m]`` 0/1 mask of the ``channels`` inner channels with the
    largest ``||a_j|| ||b_j||`` per head (``a [H, m, k]``, ``b [H, n, m]``);
    all ones when ``channels >= m``."""
    score = a.norm(dim=-1) * b.norm(dim=-2)
    keep = score.topk(min(channels, score.shape[-1]), dim=-1).indices
    return torch.zeros_like(score).scatter_(-1, keep, 1.0)


@REGULARIZERS.register
class AlignmentGrowthRegularizer(ColinearityDecayRegularizer):
    """The CD update with the opposite sign (``alignment_growth``), with
    CD's schedule options (see :class:`ColinearityDecayRegularizer`).

    Args:
        strength: ``lam`` (>= 0, required): growth rate per unit lr.
        max_alignment: a pair whose mean alignment (over heads, see
            :func:`~mmcd.core.colinearity.alignment`) is at or above this
            value is left unchanged at that step (None: no cap). Random
            pairs score about 1, a rank-1 pair its inner dimension.
        channels: grow through the ``channels`` most aligned inner channels
            of each pair (and head) only (None: all channels).
        interval, begin, end, warmup_iters, power_iters: as for ``cd``
            (one pair at a time, no CUDA graph: this makes a model to
            study, its speed does not matter).

    Logs ``alignment_growth_update_norm``, ``alignment_growth_align_{kind}
    _mean`` / ``_max``, ``alignment_growth_capped_pairs`` and
    ``alignment_growth_skipped_pairs`` (non-finite, left unchanged).
    """
    name = 'alignment_growth'

    def __init__(self, strength: float,
                 max_alignment: Optional[float] = None,
                 channels: Optional[int] = None, interval: int = 1,
                 begin: int = 0, end: Optional[int] = None,
                 warmup_iters: int = 0, power_iters: int = 1):
        super().__init__(strength, interval, begin, end, warmup_iters,
                         power_iters, cuda_graph=False)
        if max_alignment is not None and not max_alignment > 0:
            raise ValueError('alignment_growth max_alignment must be > 0 or '
                             f'None, got {max_alignment}')
        if channels is not None and not (isinstance(channels, int)
                                         and channels >= 1):
            raise ValueError('alignment_growth channels must be an integer '
                             f'>= 1 or None, got {channels!r}')
        self.max_alignment, self.channels = max_alignment, channels
        self.pairs, self.sigmas = [], {}

    def bind(self, model, pairs, lr_of) -> None:
        self.pairs, self.lr_of = list(pairs), lr_of
        state = self.state_dict()
        self.sigmas = {p.name: (SpectralNormEstimator(self.power_iters),
                                SpectralNormEstimator(self.power_iters))
                       for p in self.pairs}
        self.load_state_dict(state)

    @torch.no_grad()
    def after_step(self, iteration, optimizer_step):
        multiplier = self.multiplier(iteration, optimizer_step)
        if multiplier == 0:
            return {}
        per_kind, update_sq, capped, skipped = {}, 0.0, 0, []
        for pair in self.pairs:
            a, b = pair.matrices()
            align = alignment(a, b)
            per_kind.setdefault(pair.kind, []).append(align)
            if (self.max_alignment is not None
                    and float(align.mean()) >= self.max_alignment):
                capped += 1
                continue
            sigma_a, sigma_b = (est(m) for est, m in zip(
                self.sigmas[pair.name], (a, b)))
            rate = self.strength * multiplier
            delta_a, delta_b, _ = colinearity_decay_deltas(
                a, b, rate * self.lr_of(pair.first_matrix),
                rate * self.lr_of(pair.second_matrix), sigma_a, sigma_b)
            if self.channels is not None:
                mask = top_channel_mask(a, b, self.channels)
                delta_a, delta_b = delta_a * mask[..., None], delta_b * mask[
                    :, None, :]
            pair_sq = float(delta_a.square().sum() + delta_b.square().sum())
            if not math.isfinite(pair_sq):
                skipped.append(pair.name)
                continue
            a.add_(delta_a)
            b.add_(delta_b)
            update_sq += pair_sq
        self._skipped = skipped
        logged = {f'{self.name}_update_norm': torch.tensor(update_sq).sqrt()}
        for kind in sorted(per_kind):
            align = torch.cat(per_kind[kind]).float()
            logged[f'{self.name}_align_{kind}_mean'] = align.mean()
            logged[f'{self.name}_align_{kind}_max'] = align.max()
        logged[f'{self.name}_capped_pairs'] = torch.tensor(capped)
        logged[f'{self.name}_skipped_pairs'] = torch.tensor(len(skipped))
        return logged

    def describe(self, logged):
        if not logged.get(f'{self.name}_skipped_pairs'):
            return None
        return (f'{self.name} skipped pairs with non-finite values (left '
                f'unchanged): {", ".join(self._skipped)}')

    def state_dict(self) -> Dict:
        return {f'{name}/{side}': est.v.clone()
                for name, ests in self.sigmas.items()
                for side, est in zip('ab', ests) if est.v is not None}

    def load_state_dict(self, state: Dict) -> None:
        for name, ests in self.sigmas.items():
            for side, est in zip('ab', ests):
                if f'{name}/{side}' in state:
                    est.v = state[f'{name}/{side}'].clone()
