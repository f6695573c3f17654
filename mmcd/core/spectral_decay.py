"""Selective Spectral Decay (S2D), a comparison regularizer for CD, as the
S2D paper has it: a loss term, so its gradient goes through the optimizer
(AdamW's normalization included) like the task loss.

Penalty on a weight ``W`` with singular values ``s_1 >= s_2 >= ...``::

    R(W) = lam / (n + 1) * sum_{i <= k} s_i^(n + 1)
    dR/dW = lam * sum_{i <= k} s_i^n u_i v_i^T

``k`` is chosen per layer as the smallest ``k <= max_rank`` whose top
components carry a share ``>= tau`` of the layer's output energy,
``sum_{i<=k} s_i^2 / sum_i s_i^2`` (our reading of "share of the neurons'
output": the fraction of ``||W x||^2`` for isotropic ``x``); when no
``k <= max_rank`` reaches ``tau`` the layer gets no penalty. The singular
vectors are recomputed every ``svd_interval`` optimizer steps and cached; in
between ``s_i = u_i^T W v_i`` is evaluated from the current weight
(differentiable in ``W``), so ``dR/dW`` is exactly the formula above with the
cached vectors, which are exact singular vectors right after a refresh.
Defaults follow the S2D paper: tau 0.95, max_rank 3, svd_interval 100,
power n = 2, lam 5e-4. A refresh that selects no matrix (small models'
spectra are often too flat for tau 0.95: on the toy Swin pretraining of
docs/experiment/planted.md the top 3 carry 0.30-0.89 of the energy) is
logged as a warning, and the number of penalized matrices as
``s2d_penalized_matrices``. Registered as the regularizer ``s2d``
(:class:`SpectralDecayRegularizer`, :mod:`.regularizers`). Pure PyTorch.
"""
from typing import Dict, Sequence

import torch

from .regularizers import REGULARIZERS, Regularizer


class SelectiveSpectralDecay:
    """S2D over a list of 2-D weights (parameters). :meth:`penalty` is
    added to the loss; :meth:`step_done` counts optimizer steps (for the
    SVD refresh)."""

    def __init__(self, weights: Sequence[torch.Tensor],
                 strength: float = 5e-4, tau: float = 0.95,
                 max_rank: int = 3, svd_interval: int = 100,
                 power: float = 2):
        if not strength >= 0:
            raise ValueError(f's2d strength must be >= 0, got {strength}')
        if not 0 < tau <= 1:
            raise ValueError(f's2d tau must be in (0, 1], got {tau}')
        if not (isinstance(max_rank, int) and max_rank >= 1):
            raise ValueError(f's2d max_rank must be an integer >= 1, got '
                             f'{max_rank}')
        if not (isinstance(svd_interval, int) and svd_interval >= 1):
            raise ValueError('s2d svd_interval must be an integer >= 1, got '
                             f'{svd_interval}')
        if not power >= 0:
            raise ValueError(f's2d power must be >= 0, got {power}')
        self.weights = list(weights)
        self.strength, self.tau, self.max_rank = float(strength), tau, \
            max_rank
        self.svd_interval, self.power = svd_interval, power
        self.steps = 0  # optimizer steps taken
        self.refreshed_at = None  # step of the cached SVD
        self.cache: Dict[int, tuple] = {}
        # the largest share any matrix's top max_rank components carried at
        # the last refresh (for the warning)
        self.largest_share = 0.0

    def top_shares(self, s: torch.Tensor) -> torch.Tensor:
        """Energy shares ``sum_{i<=k} s_i^2 / sum_i s_i^2`` for ``k = 1 ..
        max_rank``."""
        energy = s.square()
        return energy.cumsum(0)[:self.max_rank] / energy.sum().clamp_min(
            torch.finfo(s.dtype).tiny)

    def selected_rank(self, s: torch.Tensor) -> int:
        """Smallest ``k <= max_rank`` with energy share ``>= tau``, or 0
        (no penalty) when none reaches it."""
        reached = (self.top_shares(s) >= self.tau).nonzero()
        return int(reached[0]) + 1 if len(reached) else 0

    @property
    def penalized(self) -> int:
        """The matrices with a rank ``k`` at the last refresh."""
        return sum(u.shape[1] > 0 for u, _ in self.cache.values())

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute and cache the top singular vectors of every weight."""
        self.largest_share = 0.0
        for i, w in enumerate(self.weights):
            u, s, vh = torch.linalg.svd(w.detach().float(),
                                        full_matrices=False)
            k = self.selected_rank(s)
            self.cache[i] = (u[:, :k].to(w.dtype), vh[:k].to(w.dtype))
            self.largest_share = max(self.largest_share,
                                     float(self.top_shares(s)[-1]))
        self.refreshed_at = self.steps

    def no_penalty_message(self) -> str:
        """Why the last refresh selected no matrix (a warning's text)."""
        return (f'S2D penalizes none of its {len(self.weights)} matrices: '
                f'their top {self.max_rank} singular values carry at most '
                f'{self.largest_share:.3f} of the energy, below tau '
                f'{self.tau} (lower tau or raise max_rank for a penalty)')

    def penalty(self) -> torch.Tensor:
        """``sum_W lam / (n + 1) sum_{i <= k} s_i^(n + 1)``, differentiable
        in the weights (refreshing the SVD when it is due)."""
        if self.refreshed_at is None or \
                self.steps - self.refreshed_at >= self.svd_interval:
            self.refresh()
        total = None
        for i, w in enumerate(self.weights):
            u, vh = self.cache[i]
            if u.shape[1] == 0:
                continue  # no k reached tau: no penalty
            s = torch.einsum('rk,rc,kc->k', u, w, vh).clamp_min(0)
            term = s.pow(self.power + 1).sum()
            total = term if total is None else total + term.to(total)
        if total is None:
            return torch.zeros((), device=self.weights[0].device)
        return total * (self.strength / (self.power + 1))

    def step_done(self) -> None:
        self.steps += 1

    def state_dict(self) -> Dict:
        return dict(steps=self.steps, refreshed_at=self.refreshed_at,
                    cache=dict(self.cache),
                    largest_share=self.largest_share)

    def load_state_dict(self, state: Dict) -> None:
        self.steps = state['steps']
        self.refreshed_at = state.get('refreshed_at', self.steps)
        self.cache = dict(state['cache'])
        self.largest_share = state.get('largest_share', 0.0)


@REGULARIZERS.register
class SpectralDecayRegularizer(Regularizer):
    """S2D as a registered regularizer (``s2d``): the penalty of
    :class:`SelectiveSpectralDecay` on the weights of the bound pairs, as a
    loss term; options as :class:`SelectiveSpectralDecay`'s (checked when
    the regularizer is built)."""
    name = 's2d'

    def __init__(self, strength: float = 5e-4, tau: float = 0.95,
                 max_rank: int = 3, svd_interval: int = 100,
                 power: float = 2):
        self.options = dict(strength=strength, tau=tau, max_rank=max_rank,
                            svd_interval=svd_interval, power=power)
        SelectiveSpectralDecay([], **self.options)  # bad options fail now
        self.decay = None
        self._warned_at = None  # the refresh last warned about

    def bind(self, model, pairs, lr_of) -> None:
        weights = {id(w): w for pair in pairs for w in pair.parameters}
        self.decay = SelectiveSpectralDecay(list(weights.values()),
                                            **self.options)

    def loss(self) -> torch.Tensor:
        return self.decay.penalty()

    def after_step(self, iteration, optimizer_step):
        self.decay.step_done()  # counts towards the SVD refresh
        if self.decay.refreshed_at is None:
            return {}
        return dict(s2d_penalized_matrices=torch.tensor(
            float(self.decay.penalized)))

    def describe(self, logged):
        """A warning once per SVD refresh that selects no matrix (the
        penalty is then zero until the next refresh)."""
        refreshed_at = self.decay.refreshed_at
        if logged.get('s2d_penalized_matrices', 1) or \
                refreshed_at == self._warned_at:
            return None
        self._warned_at = refreshed_at
        return self.decay.no_penalty_message()

    def state_dict(self) -> Dict:
        return self.decay.state_dict() if self.decay is not None else {}

    def load_state_dict(self, state: Dict) -> None:
        self.decay.load_state_dict(state)
