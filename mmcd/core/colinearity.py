"""Colinearity Decay (CD): the alignment metric and the decoupled update.

For an ordered pair ``y = B act(A x)``, output ``k`` is
``sum_i s_i (b_k . u_i)(v_i . x)`` (``A = sum_i s_i u_i v_i^T``): a row
``b_k`` of ``B`` colinear with a top left singular vector ``u_i`` of ``A``
amplifies everything along ``v_i``, which is where activation outliers come
from. CD decays that alignment.

Penalty (reference formulation of the mmcd issue tracker; the CD paper's
equations are not public)::

    R(A, B) = 1/2 ||B A||_F^2,   dR/dA = B^T B A,   dR/dB = B A A^T

Update, decoupled and applied after the optimizer step like AdamW's weight
decay, with ``eta`` the parameter group's current lr and ``lam`` the
strength, both matrices computed from their values before the update::

    A <- A - eta * lam * B^T B A / ||B||_2^2
    B <- B - eta * lam * B A A^T / ||A||_2^2

Why this normalization: ``||B^T B A|| / ||B||_2^2 <= ||A||`` (any unitarily
invariant norm), so one step never removes more than ``eta * lam`` of ``A``:
along a direction where ``B`` is fully aligned with ``A`` the update is
weight decay of strength ``lam``; along directions ``B`` does not see
(``B A = 0``) it does nothing. The norms make the update invariant to the
scale of the partner matrix. Spectral norms come from warm-started power
iteration (:class:`SpectralNormEstimator`).

Cost: with ``A [m, k]`` and ``B [n, m]`` the three products are ordered by
their flop count: ``B^T (B A)`` and ``(B A) A^T`` (``3nmk``) for wide inner
dimensions (FFN), or the Gram matrices ``(B^T B) A`` and ``B (A A^T)``
(``2m^2(n + k)``) for narrow ones (attention heads). Pure PyTorch.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch


def alignment(a: torch.Tensor, b: torch.Tensor,
              ba_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Colinearity of ``B`` with ``A``, per batch entry (head).

    ``m ||B A||_F^2 / (||A||_F^2 ||B||_F^2)`` with ``m`` the inner
    dimension. For independent random matrices the expectation of the
    numerator is ``||A||_F^2 ||B||_F^2 / m``, so random pairs score about 1
    whatever their shapes; a rank-1 pair whose directions coincide scores
    ``m`` (the maximum); ``B A = 0`` scores 0.

    Args:
        a: ``[H, m, k]``; b: ``[H, n, m]``.
        ba_sq: ``||B A||_F^2`` per head if already known.
    """
    if ba_sq is None:
        ba_sq = torch.linalg.matrix_norm(b @ a).square()
    inner = a.shape[-2]
    denom = a.square().sum((-2, -1)) * b.square().sum((-2, -1))
    return inner * ba_sq / denom.clamp_min(torch.finfo(a.dtype).tiny)


def penalty_gradients(a: torch.Tensor, b: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B^T B A, B A A^T)``, the gradients of ``1/2 ||B A||_F^2``, in the
    cheaper of the two association orders."""
    heads, m, k = a.shape
    n = b.shape[-2]
    if 3 * n * m * k <= 2 * m * m * (n + k):
        ba = b @ a
        return b.transpose(-2, -1) @ ba, ba @ a.transpose(-2, -1)
    return (b.transpose(-2, -1) @ b) @ a, b @ (a @ a.transpose(-2, -1))


class SpectralNormEstimator:
    """Largest singular value of a batch of matrices by power iteration,
    warm-started from the previous call's right singular vectors.

    The first call runs ``init_iters`` iterations from a fixed-seed start
    (identical on every rank, so DDP replicas stay identical); later calls
    run ``iters``. Power iteration underestimates ``sigma_max`` until it has
    converged; weights move little between optimizer steps, so the warm
    start keeps it converged.
    """

    def __init__(self, iters: int = 1, init_iters: int = 10):
        if iters < 1 or init_iters < 1:
            raise ValueError('power iterations must be >= 1')
        self.iters, self.init_iters = iters, init_iters
        self.v: Optional[torch.Tensor] = None

    def __call__(self, mat: torch.Tensor) -> torch.Tensor:
        """``mat [H, r, c]`` -> ``sigma_max [H]``."""
        iters = self.iters
        if self.v is None or self.v.shape != mat.shape[::2] or \
                self.v.device != mat.device:
            gen = torch.Generator().manual_seed(0)
            v = torch.randn(mat.shape[0], mat.shape[-1], generator=gen)
            self.v = v.to(device=mat.device, dtype=mat.dtype)
            iters = self.init_iters
        v = self.v
        for _ in range(iters):
            u = torch.nn.functional.normalize(
                (mat @ v.unsqueeze(-1)).squeeze(-1), dim=-1)
            v = torch.nn.functional.normalize(
                (mat.transpose(-2, -1) @ u.unsqueeze(-1)).squeeze(-1),
                dim=-1)
        self.v = v
        return torch.linalg.vector_norm(mat @ v.unsqueeze(-1), dim=(-2, -1))

    def state_dict(self) -> dict:
        return {'v': self.v}

    def load_state_dict(self, state: dict) -> None:
        self.v = state['v']


def colinearity_decay_deltas(
        a: torch.Tensor, b: torch.Tensor, scale_a: float, scale_b: float,
        sigma_a: torch.Tensor, sigma_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CD update of one pair, to be *subtracted* from ``A`` and ``B``.

    Args:
        a, b: ``[H, m, k]`` and ``[H, n, m]`` (values before the update).
        scale_a, scale_b: ``lr * strength`` of each matrix's param group.
        sigma_a, sigma_b: spectral norms per head, ``[H]``.

    Returns:
        ``(delta_a, delta_b, ba_sq)`` where ``ba_sq = ||B A||_F^2`` per head
        (``<B^T B A, A>``), which gives the alignment for free.
    """
    grad_a, grad_b = penalty_gradients(a, b)
    tiny = torch.finfo(a.dtype).tiny
    delta_a = grad_a * (scale_a / sigma_b.square().clamp_min(tiny))[:, None,
                                                                     None]
    delta_b = grad_b * (scale_b / sigma_a.square().clamp_min(tiny))[:, None,
                                                                     None]
    ba_sq = (grad_a * a).sum((-2, -1))
    return delta_a, delta_b, ba_sq


class ColinearityDecay:
    """CD over a list of :class:`~mmcd.core.pairs.MatrixPair`.

    Args:
        pairs: the pairs to decay.
        strength: ``lam`` above (>= 0).
        power_iters: power iterations per call (warm-started).
    """

    def __init__(self, pairs: Sequence, strength: float,
                 power_iters: int = 1):
        if not strength >= 0:  # also rejects NaN
            raise ValueError(f'CD strength must be >= 0, got {strength}')
        self.pairs, self.strength = list(pairs), float(strength)
        self.sigma = {(p.name, side): SpectralNormEstimator(power_iters)
                      for p in self.pairs for side in 'ab'}

    @torch.no_grad()
    def step(self, lr_of: Callable[[torch.Tensor], float],
             multiplier: float = 1.0) -> Dict:
        """Apply one decoupled CD update to every pair.

        Args:
            lr_of: current lr of the param group that holds a parameter.
            multiplier: extra factor (warm-up ramp, interval).

        Returns:
            ``{'alignment': {kind: tensor of per-head alignments}, 'update_sq':
            sum of squared update entries (tensor), 'skipped': names of
            pairs with non-finite values, which are left untouched}``.
        """
        updates, finite, per_kind = [], [], {}
        for pair in self.pairs:
            a, b = pair.matrices()
            wa, wb = pair.first.weight, pair.second.weight
            sig_a = self.sigma[(pair.name, 'a')](a)
            sig_b = self.sigma[(pair.name, 'b')](b)
            base = self.strength * multiplier
            da, db, ba_sq = colinearity_decay_deltas(
                a, b, base * lr_of(wa), base * lr_of(wb), sig_a, sig_b)
            updates.append((a, b, da, db))
            finite.append(torch.isfinite(ba_sq).all()
                          & torch.isfinite(da).all()
                          & torch.isfinite(db).all())
            per_kind.setdefault(pair.kind, []).append(alignment(a, b, ba_sq))
        if not updates:
            return dict(alignment={}, update_sq=torch.zeros(()), skipped=[])
        finite = torch.stack(finite).tolist()  # one sync for all pairs
        update_sq = torch.zeros((), device=updates[0][0].device)
        skipped = []
        for pair, ok, (a, b, da, db) in zip(self.pairs, finite, updates):
            if not ok:
                skipped.append(pair.name)
                continue
            a.sub_(da)
            b.sub_(db)
            update_sq += da.square().sum() + db.square().sum()
        return dict(alignment={k: torch.cat(v) for k, v in per_kind.items()},
                    update_sq=update_sq, skipped=skipped)

    def state_dict(self) -> Dict:
        return {f'{name}/{side}': est.state_dict()
                for (name, side), est in self.sigma.items()}

    def load_state_dict(self, state: Dict) -> None:
        for (name, side), est in self.sigma.items():
            if f'{name}/{side}' in state:
                est.load_state_dict(state[f'{name}/{side}'])
