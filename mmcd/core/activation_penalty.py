"""TWEO-style activation penalty, the comparison method of the CD paper.

Added to the task loss (not decoupled)::

    L_act = lam * mean_over_blocks( mean( (|y_block| / tau)^p ) )

with ``y_block`` the output of each Transformer block, collected by forward
hooks during training forward passes. Defaults: tau 3, p 4, lam 0.01: values
well under ``tau`` cost almost nothing, outliers cost a lot. Registered
as the regularizer ``tweo`` (:class:`ActivationPenaltyRegularizer`, on the
blocks that hold the matrix pairs). Pure PyTorch.
"""
from typing import List, Sequence

import torch
from torch import nn

from .regularizers import REGULARIZERS, Regularizer


def check_options(weight: float, tau: float, p: float) -> None:
    if not weight >= 0 or not tau > 0 or not p > 0:
        raise ValueError('TWEO needs weight >= 0, tau > 0 and p > 0, got '
                         f'{weight}, {tau}, {p}')


class ActivationPenalty:
    """Collects block outputs by forward hooks and returns the penalty.

    Args:
        blocks: the Transformer blocks whose outputs are penalized.
        weight: ``lam``; tau, p: as above.
    """

    def __init__(self, blocks: Sequence[nn.Module], weight: float = 0.01,
                 tau: float = 3.0, p: float = 4.0):
        check_options(weight, tau, p)
        if not blocks:
            raise ValueError('TWEO needs at least one block to hook')
        self.weight, self.tau, self.p = float(weight), float(tau), float(p)
        self.terms: List[torch.Tensor] = []
        self.handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, module, inputs, output):
        if not (module.training and torch.is_grad_enabled()):
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        self.terms.append(((out.abs() / self.tau) ** self.p).mean())

    def pop_loss(self) -> torch.Tensor:
        """The penalty of the forward passes since the last call (0 when
        there were none), and forget them."""
        terms, self.terms = self.terms, []
        if not terms:
            return torch.zeros(())
        return self.weight * torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.terms = [], []


@REGULARIZERS.register
class ActivationPenaltyRegularizer(Regularizer):
    """TWEO as a registered regularizer (``tweo``): :class:`ActivationPenalty`
    on the outputs of the blocks that hold the bound pairs (a pair
    ``stages.0.blocks.1.ffn`` belongs to block ``stages.0.blocks.1``)."""
    name = 'tweo'

    def __init__(self, weight: float = 0.01, tau: float = 3.0,
                 p: float = 4.0):
        check_options(weight, tau, p)
        self.options = dict(weight=weight, tau=tau, p=p)
        self.penalty = None

    def bind(self, model, pairs, lr_of) -> None:
        modules = dict(model.named_modules())
        blocks = sorted({pair.name.rsplit('.', 1)[0] for pair in pairs})
        self.penalty = ActivationPenalty(
            [modules[b] for b in blocks if b in modules], **self.options)

    def unbind(self) -> None:
        if self.penalty is not None:
            self.penalty.remove()

    def loss(self) -> torch.Tensor:
        return self.penalty.pop_loss()
