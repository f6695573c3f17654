"""Selective Spectral Decay (S2D), a comparison regularizer for CD.

Penalty on a weight ``W`` with singular values ``s_1 >= s_2 >= ...``::

    R(W) = lam / (n + 1) * sum_{i <= k} s_i^(n + 1)
    dR/dW = lam * sum_{i <= k} s_i^n u_i v_i^T

applied, like CD, as a decoupled update after the optimizer step:
``W <- W - lr * dR/dW``. ``k`` is chosen per layer as the smallest
``k <= max_rank`` whose top components carry a share ``>= tau`` of the
layer's output energy, ``sum_{i<=k} s_i^2 / sum_i s_i^2`` (our reading of
"share of the neurons' output": the fraction of ``||W x||^2`` for isotropic
``x``), else ``max_rank``. The singular vectors are recomputed every
``svd_interval`` steps and cached; in between ``s_i = u_i^T W v_i`` is
re-evaluated from the current weight, which is exact while the cached
vectors are still singular vectors and cheap (no SVD) otherwise.
Defaults follow the S2D paper: tau 0.95, max_rank 3, svd_interval 100,
power n = 2, lam 5e-4. Pure PyTorch.
"""
from typing import Callable, Dict, Sequence

import torch


class SelectiveSpectralDecay:
    """S2D over a list of 2-D weights (parameters)."""

    def __init__(self, weights: Sequence[torch.Tensor],
                 strength: float = 5e-4, tau: float = 0.95,
                 max_rank: int = 3, svd_interval: int = 100,
                 power: int = 2):
        if not strength >= 0:
            raise ValueError(f'S2D strength must be >= 0, got {strength}')
        if not 0 < tau <= 1 or max_rank < 1 or svd_interval < 1:
            raise ValueError('S2D needs 0 < tau <= 1, max_rank >= 1 and '
                             'svd_interval >= 1')
        self.weights = list(weights)
        self.strength, self.tau, self.max_rank = float(strength), tau, \
            max_rank
        self.svd_interval, self.power = svd_interval, power
        self.steps = 0
        self.cache: Dict[int, tuple] = {}

    def selected_rank(self, s: torch.Tensor) -> int:
        """Smallest ``k <= max_rank`` with energy share ``>= tau``."""
        share = s.square().cumsum(0) / s.square().sum().clamp_min(
            torch.finfo(s.dtype).tiny)
        reached = (share >= self.tau).nonzero()
        k = int(reached[0]) + 1 if len(reached) else self.max_rank
        return min(k, self.max_rank)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute and cache the top singular vectors of every weight."""
        for i, w in enumerate(self.weights):
            u, s, vh = torch.linalg.svd(w.detach().float(),
                                        full_matrices=False)
            k = self.selected_rank(s)
            self.cache[i] = (u[:, :k].to(w.dtype), vh[:k].to(w.dtype))

    @torch.no_grad()
    def step(self, lr_of: Callable[[torch.Tensor], float],
             multiplier: float = 1.0) -> torch.Tensor:
        """One decoupled S2D update; returns the squared update norm."""
        if self.steps % self.svd_interval == 0 or not self.cache:
            self.refresh()
        self.steps += 1
        update_sq = torch.zeros(())
        for i, w in enumerate(self.weights):
            u, vh = self.cache[i]
            s = torch.einsum('rk,rc,kc->k', u, w.detach(), vh)
            grad = (u * s.clamp_min(0).pow(self.power)) @ vh
            delta = grad * (self.strength * multiplier * lr_of(w))
            w.data.sub_(delta)
            update_sq = update_sq.to(delta.device) + delta.square().sum()
        return update_sq

    def state_dict(self) -> Dict:
        return dict(steps=self.steps, cache=dict(self.cache))

    def load_state_dict(self, state: Dict) -> None:
        self.steps = state['steps']
        self.cache = dict(state['cache'])
