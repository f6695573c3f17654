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
(``2m^2(n + k)``) for narrow ones (attention heads).

:class:`ColinearityDecayRegularizer` is CD as a registered regularizer
(``cd``, :mod:`.regularizers`), with its schedule. Pure PyTorch.
"""
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .regularizers import REGULARIZERS, Regularizer


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
        v, tiny = self.v, torch.finfo(mat.dtype).tiny
        for _ in range(iters):  # v unit-norm: sigma ~ ||M v||, v <- M^T M v
            mv = mat @ v.unsqueeze(-1)
            sigma = torch.linalg.vector_norm(mv, dim=(-2, -1))
            v = (mat.transpose(-2, -1) @ mv).squeeze(-1)
            v = v / torch.linalg.vector_norm(v, dim=-1,
                                             keepdim=True).clamp_min(tiny)
        self.v.copy_(v)  # in place: a captured CUDA graph keeps the buffer
        return sigma


def colinearity_decay_deltas(
        a: torch.Tensor, b: torch.Tensor, scale_a, scale_b,
        sigma_a: torch.Tensor, sigma_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CD update of one pair, to be *subtracted* from ``A`` and ``B``.

    Args:
        a, b: ``[H, m, k]`` and ``[H, n, m]`` (values before the update).
        scale_a, scale_b: ``lr * strength`` of each matrix's param group
            (a float, or one value per head ``[H]``).
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


def check_strength(strength: float) -> None:
    if not strength >= 0:  # also rejects NaN
        raise ValueError(f'cd strength must be >= 0, got {strength}')


class ColinearityDecay:
    """CD over a list of :class:`~mmcd.core.pairs.MatrixPair`.

    Pairs of the same shapes (e.g. the vo and qk pairs of all blocks of a
    Swin stage) are stacked and processed as one batch, so a step costs a few dozen kernel
    launches per group rather than per pair, and no host-device sync:
    non-finite pairs are masked on the device and reported in the returned
    stats.

    With ``cuda_graph=True`` and weights on a GPU, the first step runs
    eagerly and the step is then captured in a CUDA graph and replayed:
    launch overhead, not arithmetic, dominates the step on a GPU. Learning
    rates enter through a device buffer refreshed before each replay. The
    parameters must keep their storage (in-place updates and
    ``load_state_dict`` do; re-creating the model does not).

    Args:
        pairs: the pairs to decay.
        strength: ``lam`` above (>= 0).
        power_iters: power iterations per call (warm-started).
        cuda_graph: capture and replay the step on CUDA.
    """

    def __init__(self, pairs: Sequence, strength: float,
                 power_iters: int = 1, cuda_graph: bool = True):
        check_strength(strength)
        self.pairs, self.strength = list(pairs), float(strength)
        groups: Dict[tuple, list] = {}
        for pair in sorted(self.pairs, key=lambda p: p.kind):
            a, b = pair.matrices()
            groups.setdefault((a.shape, b.shape), []).append(pair)
        self.groups = [(members, SpectralNormEstimator(power_iters),
                        SpectralNormEstimator(power_iters))
                       for members in groups.values()]
        self.cuda_graph = cuda_graph
        self._graph = self._graph_stats = self._scale_buffer = None

    @torch.no_grad()
    def step(self, lr_of: Callable[[torch.Tensor], float],
             multiplier: float = 1.0) -> Dict:
        """Apply one decoupled CD update to every pair.

        Args:
            lr_of: current lr of the param group that holds a parameter.
            multiplier: extra factor (warm-up ramp, interval).

        Returns:
            ``alignment``: ``{kind: per-head alignments}``; ``update_sq``: sum
            of squared update entries; ``finite``: one flag per pair of
            ``names`` (pairs with non-finite values are left untouched).
            All tensors stay on the weights' device. Under a CUDA graph the
            replays return the graph's static outputs, the same objects
            every step, overwritten by the next step: copy what you keep.
        """
        lrs = self._scale_values(lr_of, self.strength * multiplier)
        weight = self.pairs[0].parameters[0] if self.pairs else None
        if not (self.cuda_graph and weight is not None and weight.is_cuda):
            return self._apply([
                tuple(v[0] if len(set(v)) == 1 else torch.tensor(
                    v, dtype=weight.dtype, device=weight.device)
                      for v in sides) for sides in lrs])
        flat = torch.tensor([x for sides in lrs for v in sides for x in v],
                            dtype=weight.dtype)
        if self._graph is None:  # eager first step, then capture
            self._scale_buffer = flat.to(weight.device)
            views = self._scale_buffer.split(
                [len(v) for sides in lrs for v in sides])
            scales = list(zip(views[0::2], views[1::2]))  # (A, B) per group
            stats = self._apply(scales)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._graph_stats = self._apply(scales)
            return stats
        self._scale_buffer.copy_(flat, non_blocking=True)
        self._graph.replay()
        return self._graph_stats

    def _scale_values(self, lr_of, base) -> List[Tuple[list, list]]:
        """``lr * strength * multiplier`` per head of every pair, for the
        ``A`` side and the ``B`` side of each group."""
        out = []
        for members, _, _ in self.groups:
            heads = members[0].num_heads  # 1 for ffn pairs
            out.append(tuple(
                [base * lr_of(getattr(p, f'{side}_matrix')) for p in members
                 for _ in range(heads)] for side in ('first', 'second')))
        return out

    def _apply(self, scales) -> Dict:
        """The step itself, with per-group ``(scale_a, scale_b)``: floats or
        per-head tensors."""
        per_kind, update_sq, finite, names = {}, [], [], []
        for (members, sigma_a, sigma_b), (scale_a, scale_b) in zip(
                self.groups, scales):
            views = [p.matrices() for p in members]
            heads = views[0][0].shape[0]
            a = torch.cat([v[0] for v in views])
            b = torch.cat([v[1] for v in views])
            da, db, ba_sq = colinearity_decay_deltas(a, b, scale_a, scale_b,
                                                     sigma_a(a), sigma_b(b))
            pair_sq = (da.square().sum((-2, -1)) + db.square().sum(
                (-2, -1))).view(len(members), heads).sum(1)
            ok = torch.isfinite(pair_sq)
            ok_heads = ok.repeat_interleave(heads)[:, None, None]
            da = torch.where(ok_heads, da, 0).split(heads)
            db = torch.where(ok_heads, db, 0).split(heads)
            torch._foreach_sub_([v[0] for v in views], list(da))
            torch._foreach_sub_([v[1] for v in views], list(db))
            update_sq.append(torch.where(ok, pair_sq, 0).sum())
            finite.append(ok)
            names += [p.name for p in members]
            align = alignment(a, b, ba_sq).split(heads)
            for pair, pair_align in zip(members, align):
                per_kind.setdefault(pair.kind, []).append(pair_align)
        if not names:
            return dict(alignment={}, update_sq=torch.zeros(()),
                        finite=torch.ones(0, dtype=torch.bool), names=[])
        return dict(alignment={k: torch.cat(v) for k, v in per_kind.items()},
                    update_sq=torch.stack(update_sq).sum(),
                    finite=torch.cat(finite), names=names)

    def state_dict(self) -> Dict:
        state = {}
        for members, sigma_a, sigma_b in self.groups:
            for side, est in (('a', sigma_a), ('b', sigma_b)):
                if est.v is None:
                    continue
                for p, v in zip(members, est.v.chunk(len(members))):
                    state[f'{p.name}/{side}'] = v.clone()
        return state

    def load_state_dict(self, state: Dict) -> None:
        for members, sigma_a, sigma_b in self.groups:
            for side, est in (('a', sigma_a), ('b', sigma_b)):
                keys = [f'{p.name}/{side}' for p in members]
                if all(k in state for k in keys):
                    est.v = torch.cat([state[k] for k in keys])


@REGULARIZERS.register
class ColinearityDecayRegularizer(Regularizer):
    """CD as a registered regularizer (``cd``): :class:`ColinearityDecay`
    on the bound pairs after every real optimizer step, on a schedule.

    Args:
        strength: ``lam`` (>= 0, required).
        interval: act every ``interval`` optimizer steps, with the update
            multiplied by ``interval`` (the same total decay).
        begin, end: iterations ``[begin, end)`` in which CD acts (end None:
            to the end of training).
        warmup_iters: linear ramp of the strength over the first
            ``warmup_iters`` iterations from ``begin``.
        power_iters: power iterations per step for the spectral norms.
        cuda_graph: on a GPU, replay the step as a CUDA graph.

    Logs ``cd_update_norm``, ``cd_align_{kind}_mean`` / ``_max`` (per-head
    alignment, :func:`alignment`) and ``cd_skipped_pairs`` (pairs left
    unchanged because of non-finite values; named in a warning).
    """
    name = 'cd'

    def __init__(self, strength: float, interval: int = 1, begin: int = 0,
                 end: Optional[int] = None, warmup_iters: int = 0,
                 power_iters: int = 1, cuda_graph: bool = True):
        check_strength(strength)
        if not (isinstance(interval, int) and interval >= 1):
            raise ValueError(f'cd interval must be an integer >= 1, got '
                             f'{interval!r}')
        if end is not None and end <= begin:
            raise ValueError(f'cd end ({end}) <= begin ({begin}): CD would '
                             'never run; set end=None to run to the end')
        if warmup_iters < 0 or begin < 0:
            raise ValueError('cd begin and warmup_iters must be >= 0')
        self.strength, self.interval = float(strength), interval
        self.begin, self.end, self.warmup_iters = begin, end, warmup_iters
        self.power_iters, self.cuda_graph = power_iters, cuda_graph
        self.decay: Optional[ColinearityDecay] = None
        self.lr_of = None
        self._last_stats: Optional[Dict] = None

    def bind(self, model, pairs, lr_of) -> None:
        self.decay = ColinearityDecay(pairs, self.strength, self.power_iters,
                                      self.cuda_graph)
        self.lr_of = lr_of

    def multiplier(self, iteration: int, optimizer_step: int) -> float:
        """Window, warm-up and interval factor of the update after
        ``iteration`` (0: no CD at this step)."""
        end = math.inf if self.end is None else self.end
        if not self.begin <= iteration < end:
            return 0.0
        if optimizer_step % self.interval:
            return 0.0
        ramp = 1.0
        if self.warmup_iters > 0:
            ramp = min(1.0, (iteration - self.begin + 1) / self.warmup_iters)
        return ramp * self.interval

    def after_step(self, iteration, optimizer_step):
        multiplier = self.multiplier(iteration, optimizer_step)
        if multiplier == 0:
            return {}
        stats = self._last_stats = self.decay.step(self.lr_of, multiplier)
        logged = {'cd_update_norm': stats['update_sq'].sqrt()}
        for kind in sorted(stats['alignment']):
            align = stats['alignment'][kind].float()
            logged[f'cd_align_{kind}_mean'] = align.mean()
            logged[f'cd_align_{kind}_max'] = align.max()
        logged['cd_skipped_pairs'] = (~stats['finite']).sum()
        return logged

    def describe(self, logged):
        if not logged.get('cd_skipped_pairs'):
            return None
        skipped = [name for name, ok in zip(
            self._last_stats['names'], self._last_stats['finite'].tolist())
            if not ok]
        return ('Colinearity decay skipped pairs with non-finite values '
                f'(left unchanged): {", ".join(skipped)}')

    def state_dict(self) -> Dict:
        return self.decay.state_dict() if self.decay is not None else {}

    def load_state_dict(self, state: Dict) -> None:
        self.decay.load_state_dict(state)
