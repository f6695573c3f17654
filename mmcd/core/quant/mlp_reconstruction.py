"""APHQ-ViT's MLP Reconstruction (Wu et al., CVPR 2025): the Transformer
MLPs' GELU becomes ReLU and ``fc1``/``fc2`` are fine-tuned, in floating
point and before calibration, so that the MLP's output matches the original
one and stays close when ``fc2``'s input is clipped, which makes that input
non-negative and bounded for the 4-bit quantizer. Pure PyTorch.

Written from the paper and its public detection code (GoatWu/APHQ-ViT,
``tools/quant_utils/mlp_recon.py`` and ``tools/test.py``). For each MLP unit
(the architecture specs' ``mlp_units``), in model order:

1. on the reconstruction images the original float model gives the MLP's
   input ``x``, output ``y`` and ``fc2``'s input ``a = GELU(fc1 x)``;
   ``u`` is the ``mlp_quantile`` (0.999) quantile of the positive values of
   ``a`` over the first 128 images (the ``ceil(n q)``-th smallest of the
   ``n`` positive values);
2. with the ``'aph'`` loss, the sensitivity weights ``w`` of the MLP's
   output (reconstruction_losses.py, on the original model);
3. ``act`` is replaced by ``nn.ReLU``; ``fc1`` and ``fc2`` (weights and
   biases) take ``mlp_iters`` Adam steps (lr ``mlp_lr`` 4e-5, cosine to 0),
   one image per step in turn, on
   ``E(MLP(x), y) / 10 + mlp_clamped_weight * E(MLP_u(x), y) / 10``, where
   ``MLP_u`` is the ReLU MLP with ``fc2``'s input clamped to ``[0, u]`` and
   ``E(p, y) = mean(sum_1 (p - y)^2 w)`` (``'aph'``) or
   ``mean(sum_1 |p - y|^p)`` (otherwise): summed over dim 1 (the tokens of a
   ``[N, L, C]`` sequence), averaged over the rest, as in the public code.

The inputs are the original model's throughout (no earlier MLP is
reconstructed in them), as in the public code. The exported and quantized
model has ReLU in these MLPs (:func:`use_relu`, applied again when a saved
quantized model is rebuilt).
"""
import math
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..architectures import MlpUnit, mlp_units
from .quantizers import UniformQuantizer
from .reconstruction import ReconstructionConfig, record_unit
from .reconstruction_losses import flat_tensors
from .unit_data import UnitData, as_runs

#: images whose ``fc2`` inputs give the clamp bound (APHQ-ViT: 128)
BOUND_IMAGES = 128


def find_mlps(model: nn.Module) -> List[Tuple[str, MlpUnit]]:
    """``(name, unit spec)`` of every MLP of ``model`` matching a registered
    :class:`~mmcd.core.architectures.MlpUnit`, in model order."""
    specs = mlp_units()
    found = []
    for name, _ in model.named_modules():
        spec = next((u for u in specs if re.fullmatch(u.pattern, name)),
                    None)
        if spec is not None:
            found.append((name, spec))
    return found


def use_relu(model: nn.Module) -> List[str]:
    """Replace the activation of every MLP of ``model`` by ``nn.ReLU``
    (idempotent) and mark ``fc2``'s input quantizer, if converted, as
    following a ReLU (APHQ-ViT's search fixes its zero point at 0:
    aphq_searches.py); returns the MLPs' names. None found is an error."""
    mlps = find_mlps(model)
    if not mlps:
        raise ValueError(
            'MLP reconstruction: no MLP in the model (the architecture '
            "specs' mlp_units match none of its modules)")
    for name, spec in mlps:
        parent_name, _, attr = f'{name}.{spec.act}'.rpartition('.')
        try:
            parent = model.get_submodule(parent_name)
            getattr(parent, attr)
        except AttributeError:
            raise ValueError(f'MLP reconstruction: {name} has no activation '
                             f'{spec.act!r}') from None
        setattr(parent, attr, nn.ReLU())
        fc2 = model.get_submodule(f'{name}.{spec.fc2}')
        if isinstance(getattr(fc2, 'input_quantizer', None),
                      UniformQuantizer):
            fc2.input_quantizer.input_follows_relu = True
    return [name for name, _ in mlps]


def positive_quantile(values: torch.Tensor, q: float) -> float:
    """The ``ceil(n q)``-th smallest of the ``n`` positive entries of
    ``values`` (APHQ-ViT's ``positive_percentile``)."""
    positive = values[values > 0].flatten().sort().values
    if not positive.numel():
        raise ValueError('MLP reconstruction: fc2 never sees a positive '
                         'input')
    rank = max(math.ceil(positive.numel() * q) - 1, 0)
    return float(positive[rank])


def mlp_error(pred, target, weight=None, p: float = 2.0) -> torch.Tensor:
    """``E`` of the module docstring, over the output tensors."""
    total = 0
    weights = flat_tensors(weight) if weight is not None else None
    for i, (a, b) in enumerate(zip(flat_tensors(pred),
                                   flat_tensors(target))):
        diff = (a - b).pow(2) * weights[i] if weights is not None else \
            (a - b).abs().pow(p)
        total = total + diff.sum(1).mean()
    return total


def reconstruct_mlp(name: str, mlp: nn.Module, spec: MlpUnit,
                    data: UnitData, bound: float,
                    cfg: ReconstructionConfig) -> Dict[str, float]:
    """Fine-tune ``mlp`` (its activation already ReLU) in place (module
    docstring, step 3) on its recorded ``data`` (the float inputs ``(args,
    kwargs)``, output and weights, :class:`~.unit_data.UnitData`). Returns
    the loss at the first and last step and the bound."""
    fc1 = mlp.get_submodule(spec.fc1)
    fc2 = mlp.get_submodule(spec.fc2)
    params = [p for layer in (fc1, fc2) for p in layer.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.mlp_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=cfg.mlp_iters, eta_min=0.)

    def clamp(module, inputs):
        return (inputs[0].clamp(0, bound), *inputs[1:])

    losses = []
    for it in range(cfg.mlp_iters):
        image = data.image(it % data.size)
        (x, kw), y, w = image['fp'], image['target'], image['weight']
        plain = mlp_error(mlp(*x, **kw), y, w, cfg.p) / 10
        handle = fc2.register_forward_pre_hook(clamp)
        try:
            clamped = mlp_error(mlp(*x, **kw), y, w, cfg.p) / 10
        finally:
            handle.remove()
        loss = plain + cfg.mlp_clamped_weight * clamped
        if not torch.isfinite(loss):
            raise FloatingPointError(f'MLP reconstruction of {name}: the '
                                     f'loss is {float(loss)} at step '
                                     f'{it + 1}')
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    for p in params:
        p.grad = None
    return dict(loss_first=losses[0], loss_last=losses[-1], bound=bound)


@torch.no_grad()
def fc2_input_bound(float_mlp: nn.Module, spec: MlpUnit, data: UnitData,
                    q: float) -> float:
    """The clamp bound ``u``: the ``q`` quantile of the positive values of
    the float MLP's ``fc2`` input ``act(fc1(x))`` over the first
    :data:`BOUND_IMAGES` images of ``data``."""
    values, left = [], BOUND_IMAGES
    for chunk, size in data:
        if left <= 0:
            break
        x = chunk['fp'][0][0][:left]
        a = float_mlp.get_submodule(spec.act)(
            float_mlp.get_submodule(spec.fc1)(x))
        values.append(a[a > 0])
        left -= size
    return positive_quantile(torch.cat(values), q)


def reconstruct_mlps(model: nn.Module, float_model: nn.Module, run,
                     cfg: ReconstructionConfig, task_loss=None,
                     progress: Optional[Callable[[int, str, Dict], None]]
                     = None) -> Dict[str, Dict[str, float]]:
    """MLP reconstruction of the float ``model`` (module docstring) against
    ``float_model`` (the original, not touched); ``run`` and ``task_loss``
    as for :func:`~mmcd.core.quant.reconstruction.reconstruct` (one
    callable, or one per chunk of the reconstruction images). Returns the
    stats per MLP."""
    names = use_relu(model)
    specs = dict(find_mlps(float_model))
    model.eval()
    float_model.eval()
    runs = as_runs(run)
    task_losses = None if task_loss is None else as_runs(task_loss)
    stats = {}
    for k, name in enumerate(names):
        spec = specs[name]
        with record_unit(name, float_model, runs, cfg, task_losses) as data:
            bound = fc2_input_bound(float_model.get_submodule(name), spec,
                                    data, cfg.mlp_quantile)
            with torch.enable_grad():
                stats[name] = reconstruct_mlp(
                    name, model.get_submodule(name), spec, data, bound, cfg)
        if progress is not None:
            progress(k, name, stats[name])
    return stats
