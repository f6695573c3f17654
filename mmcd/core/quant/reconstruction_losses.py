"""What block (and MLP) reconstruction minimises, by name. Pure PyTorch.

A reconstruction loss compares a unit's quantized output ``pred`` with the
float one ``target`` (tensors, or tuples/lists of them, images on dim 0).
``RECONSTRUCTION_LOSSES.register(cls, name=...)`` adds one; a fresh instance
is built per unit (``cls(p=..., unit=NAME)``), so a loss may keep per-unit
state. When its :meth:`~ReconstructionLoss.needs_weights` is true for the
unit, it is given per-element weights ``weight`` (the structure of
``target``) computed by :func:`perturbation_sensitivity` from a task
objective the caller supplies (for a detector: the RPN's, see
``mmcd.engine.calibration``). Built in:

``lp`` (QDrop, ``solver/recon.py`` ``lp_loss``)
    ``sum_channels |pred - target|^p``, averaged over the other dims and
    summed over output tensors (:func:`lp_channel_loss`).

``aph`` (APHQ-ViT, CVPR 2025, Average Perturbation Hessian; its detection
code, ``tools/quant_utils/block_recon.py``)
    for units under ``backbone.``: ``sum (pred - target)^2 * w`` with the
    sensitivity weights ``w`` below; for the others (the neck): the mean of
    ``|pred - target|^p`` over all elements of all output tensors. Either is
    rescaled so that its value at the first iteration is 2 (``* 2 / L_1``,
    ``L_1`` a constant).

The weights (APHQ-ViT's "hessian_perturb" metric): with the unit's float
output ``y`` perturbed to ``y + e 1`` and ``y - e 1`` (``e = 1e-3``), the
gradients ``g+`` and ``g-`` of the task objective ``L`` with respect to the
output are taken; ``w = |g+ - g-|`` (``~ 2 e |H 1|``, the Hessian of ``L``
applied to the all-ones perturbation, averaged over the perturbation's two
signs), then normalised per image to mean 1 (``w * numel / sum``). An image
whose ``w`` is 0 everywhere (the perturbation moves its objective below
float32 resolution, where the public code divides 0 by 0) gets ``w = 1``:
its plain squared error.
"""
import re
from typing import Callable, List, Optional

import torch
from torch import nn

from ..registry import Registry

#: Reconstruction losses by name (module docstring).
RECONSTRUCTION_LOSSES = Registry('reconstruction loss')


def flat_tensors(obj) -> List[torch.Tensor]:
    """The floating-point tensors of ``obj`` (nested tuples/lists), in
    order."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in flat_tensors(o)]
    return []


def lp_channel_loss(pred, target, p: float = 2.0) -> torch.Tensor:
    """QDrop's ``lp_loss`` summed over the output tensors: ``|pred -
    target|^p`` summed over the channels (dim 1 of an ``NCHW`` map, the
    last dim of a token sequence ``[N, L, C]``), averaged over the rest."""
    total = 0
    for a, b in zip(flat_tensors(pred), flat_tensors(target)):
        diff = (a - b).abs().pow(p)
        channels = 1 if diff.dim() == 4 else -1
        total = total + diff.sum(channels).mean()
    return total


class ReconstructionLoss:
    """A loss of one unit (module docstring). ``unit`` is the unit's module
    name (a loss may treat units differently)."""

    def __init__(self, p: float = 2.0, unit: str = ''):
        self.p, self.unit = p, unit

    def needs_weights(self) -> bool:
        """Whether the unit's error is weighted by the task objective's
        sensitivity (:func:`perturbation_sensitivity`)."""
        return False

    def __call__(self, pred, target, weight=None) -> torch.Tensor:
        raise NotImplementedError


@RECONSTRUCTION_LOSSES.register(name='lp')
class LpLoss(ReconstructionLoss):
    """QDrop's loss (:func:`lp_channel_loss`)."""

    def __call__(self, pred, target, weight=None) -> torch.Tensor:
        return lp_channel_loss(pred, target, self.p)


@RECONSTRUCTION_LOSSES.register(name='aph')
class AphLoss(ReconstructionLoss):
    """APHQ-ViT's loss (module docstring): sensitivity-weighted squared
    error on the backbone's units, mean ``|.|^p`` elsewhere, rescaled to 2
    at the first call."""
    #: the units whose error is weighted (APHQ-ViT: ``'backbone' in name``)
    weighted = re.compile(r'backbone\.')

    def __init__(self, p: float = 2.0, unit: str = ''):
        super().__init__(p, unit)
        self.first: Optional[float] = None

    def needs_weights(self) -> bool:
        return self.weighted.match(self.unit) is not None

    def raw(self, pred, target, weight=None) -> torch.Tensor:
        preds, targets = flat_tensors(pred), flat_tensors(target)
        if self.needs_weights():
            if weight is None:
                raise ValueError(f'{self.unit}: the aph loss needs the '
                                 'sensitivity weights of the unit')
            return sum(((a - b).pow(2) * w).sum() for a, b, w in
                       zip(preds, targets, flat_tensors(weight)))
        count = sum(t.numel() for t in targets)
        return sum((a - b).abs().pow(self.p).sum()
                   for a, b in zip(preds, targets)) / count

    def __call__(self, pred, target, weight=None) -> torch.Tensor:
        loss = self.raw(pred, target, weight)
        if self.first is None:
            self.first = float(loss)
        return loss * 2 / self.first if self.first > 0 else loss


def _map_outputs(out, change: Callable[[torch.Tensor], object]):
    """``out`` with each floating-point tensor ``t`` replaced by
    ``change(t)`` and anything else by None (nested tuples/lists kept)."""
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        return change(out)
    if isinstance(out, (list, tuple)):
        return type(out)(_map_outputs(o, change) for o in out)
    return None


def perturbation_sensitivity(model: nn.Module, unit: nn.Module,
                             task_loss: Callable[[nn.Module], torch.Tensor],
                             eps: float = 1e-3):
    """APHQ-ViT's weights for ``unit``'s output (module docstring):
    ``task_loss(model)`` runs ``model`` (gradients on) and returns the task
    objective, which is minimal (zero) at the unperturbed float output.
    Returns ``w`` with the structure of the unit's output (detached tensors;
    None for its non-tensor parts, e.g. a feature map's size)."""
    grads, leaves, structure = [], [], []
    for sign in (1.0, -1.0):
        leaves.clear()

        def perturb(module, args, out, sign=sign):
            def leaf(t):
                leaves.append((t.detach() + sign * eps).requires_grad_(True))
                return leaves[-1]
            structure.append(out)
            return _merge(out, _map_outputs(out, leaf))

        handle = unit.register_forward_hook(perturb)
        try:
            with torch.enable_grad():
                loss = task_loss(model)
                if not leaves:
                    raise RuntimeError('the unit never ran in the task '
                                       "objective's forward pass")
                if torch.is_tensor(loss) and loss.requires_grad:
                    grads.append(torch.autograd.grad(loss, list(leaves),
                                                     allow_unused=True))
                else:  # an objective without any term: no sensitivity
                    grads.append((None, ) * len(leaves))
        finally:
            handle.remove()
    weights = []
    for up, down, leaf in zip(*grads, leaves):
        if up is None or down is None:  # this output does not reach the loss
            weights.append(torch.ones_like(leaf).detach())
            continue
        diff = (up - down).abs()
        per_image = diff.flatten(1).sum(1)
        flat = per_image == 0  # no measurable sensitivity: plain error
        diff[flat] = 1
        per_image[flat] = diff[0].numel()
        weights.append(diff * (diff[0].numel() / per_image).view(
            -1, *([1] * (diff.dim() - 1))))
    it = iter(weights)
    return _map_outputs(structure[0], lambda t: next(it))


def _merge(out, perturbed):
    """``perturbed`` where it holds a tensor, ``out`` elsewhere."""
    if isinstance(out, (list, tuple)):
        return type(out)(_merge(o, q) for o, q in zip(out, perturbed))
    return out if perturbed is None else perturbed
