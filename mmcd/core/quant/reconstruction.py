"""Block reconstruction after calibration: AdaRound weight rounding, learned
activation step sizes and QDrop's random dropping of activation
quantization, unit by unit. Pure PyTorch.

Sources: AdaRound (Nagel et al., ICML 2020), BRECQ's block units (Li et al.,
ICLR 2021), QDrop (Wei et al., ICLR 2022) and its public code
(wimh966/QDrop, ``solver/recon.py``, ``quantization/fake_quant.py``), read
and re-written here.

For each reconstruction unit (a Transformer block, a patch merging, the
patch embedding, the neck: the architecture specs' ``reconstruction_units``),
in model order:

1. its inputs are recorded twice on the calibration images, from the float
   model (``x_fp``, with the float output ``y_fp``) and from the quantized
   model whose earlier units are already reconstructed (``x_q``), chunk by
   chunk of images, in memory or a disk cache (unit_data.py);
2. every weight quantizer of the unit becomes an :class:`AdaRoundQuantizer`
   on its calibrated grid: ``W^ = s (clamp(floor(W / s) + h(V) + z, 0,
   2^b - 1) - z)`` with the rectified sigmoid ``h(V) = clamp(sigmoid(V)
   (zeta - gamma) + gamma, 0, 1)``, ``zeta = 1.1``, ``gamma = -0.1``, ``V``
   initialised so that ``h(V)`` is the fractional part of ``W / s`` (the
   soft weight starts equal to the float one);
3. every uniform activation quantizer of the unit learns its step (per
   head for per-head grids), its zero point fixed (QDrop's ``LSQFakeQuantize``,
   learned_step.py), post-softmax quantizers keep theirs;
4. ``iters`` steps of Adam (``V``: default lr 1e-3; steps: ``act_lr``,
   cosine to 0) on ``rec + lambda sum(1 - |2 h(V) - 1|^beta)`` over
   mini-batches of ``batch_size`` images (at random, or in turn:
   ``order``), where ``rec`` is the registered
   loss ``loss`` (default QDrop's ``sum_channels |y - y_fp|^p`` averaged
   over the rest; ``'aph'``: APHQ-ViT's, reconstruction_losses.py), the
   unit's input is ``x_q`` elementwise with probability ``input_prob`` and
   ``x_fp`` otherwise, each activation quantizer's output is its quantized
   value with probability ``drop_prob`` and its input otherwise (QDrop;
   both 1: plain BRECQ-style reconstruction), and ``beta`` is 20 for the
   first ``warmup`` share of the iterations, then falls linearly to 2 (the
   regulariser is off during the warm-up);
5. the rounding is made hard (``h = 1`` where ``V >= 0``), the learned
   steps become the quantizers' scales.
"""
import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .learned_step import LearnedStepQuantizer
from .quantizers import FakeQuantizer, UniformQuantizer
from .reconstruction_losses import (RECONSTRUCTION_LOSSES, lp_channel_loss,
                                    perturbation_sensitivity)
from .unit_data import Run, UnitData, as_runs

#: AdaRound's rectified-sigmoid stretch
GAMMA, ZETA = -0.1, 1.1
#: the options of :class:`ReconstructionConfig` that say where data lives
#: and how much runs at once, not what is computed
MEMORY_OPTIONS = ('chunk_images', 'cache_dir')
#: how a unit's mini-batches are drawn (ReconstructionConfig.order)
BATCH_ORDERS = ('random', 'in_turn')


@dataclass(frozen=True)
class ReconstructionConfig:
    """Options (module docstring), defaults from QDrop's code and APHQ-ViT's
    detection code: ``iters`` 20000 per unit, ``batch_size`` 1 image
    (APHQ-ViT's detection setting; QDrop's ImageNet one is 32),
    ``round_weight`` (lambda) 0.01, ``beta`` (20, 2), ``warmup`` 0.2,
    ``weight_lr`` 1e-3 (Adam's default, as both codes leave it),
    ``act_lr`` 4e-5, ``drop_prob`` 0.5 (activation quantizers),
    ``input_prob`` (the unit's input; None: ``drop_prob``, as QDrop ties
    them; APHQ-ViT's ``quant_ratio``), ``p`` 2, ``loss`` a registered
    reconstruction loss (``'lp'``: QDrop's, ``'aph'``: APHQ-ViT's;
    reconstruction_losses.py), ``perturbation`` 1e-3 (the APH weights'),
    ``seed`` 0; ``num_images``: the images the units are reconstructed on
    (None: the calibration images; APHQ-ViT's detection code calibrates on
    1 and reconstructs on 256), read by whoever loads them
    (``mmcd.engine``). ``mlp``: APHQ-ViT's MLP reconstruction first
    (mlp_reconstruction.py) with ``mlp_iters`` 20000 per MLP, ``mlp_lr``
    4e-5, ``mlp_quantile`` 0.999 and ``mlp_clamped_weight`` 2. ``order``
    of the mini-batches (:data:`BATCH_ORDERS`): ``'random'``, each drawn at
    random (QDrop's code), or ``'in_turn'``, consecutive images in recording
    order, cycling (APHQ-ViT's code: image ``it mod N`` at step ``it``).

    Memory (:data:`MEMORY_OPTIONS`, read by whoever runs the model):
    ``chunk_images``, the images per forward pass when a unit's data is
    recorded (None: all reconstruction images in one pass), and
    ``cache_dir``, where the recorded data is kept on disk (None: in
    memory; unit_data.py). They change the padded size of the images of a
    chunk, nothing else."""
    iters: int = 20000
    batch_size: int = 1
    round_weight: float = 0.01
    beta: Tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    weight_lr: float = 1e-3
    act_lr: float = 4e-5
    drop_prob: float = 0.5
    input_prob: Optional[float] = None
    p: float = 2.0
    loss: str = 'lp'
    perturbation: float = 1e-3
    seed: int = 0
    num_images: Optional[int] = None
    mlp: bool = False
    mlp_iters: int = 20000
    mlp_lr: float = 4e-5
    mlp_quantile: float = 0.999
    mlp_clamped_weight: float = 2.0
    chunk_images: Optional[int] = None
    cache_dir: Optional[str] = None
    order: str = 'random'

    def __post_init__(self):
        if self.order not in BATCH_ORDERS:
            raise ValueError(f'reconstruction order must be one of '
                             f'{BATCH_ORDERS}, got {self.order!r}')
        for key in ('iters', 'batch_size', 'mlp_iters'):
            value = getattr(self, key)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f'reconstruction {key} must be an integer '
                                 f'>= 1, got {value!r}')
        for key in ('drop_prob', 'input_prob'):
            value = getattr(self, key)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f'reconstruction {key} (the probability of '
                                 'keeping quantization) must be in (0, 1], '
                                 f'got {value}')
        for key in ('num_images', 'chunk_images'):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and
                                          value >= 1):
                raise ValueError(f'reconstruction {key} must be an integer '
                                 f'>= 1 or None, got {value!r}')
        if not 0 <= self.warmup < 1:
            raise ValueError(f'reconstruction warmup must be in [0, 1), got '
                             f'{self.warmup}')
        if not 0 < self.mlp_quantile <= 1:
            raise ValueError('reconstruction mlp_quantile must be in (0, 1], '
                             f'got {self.mlp_quantile}')
        if not isinstance(self.mlp, bool):
            raise ValueError(f'reconstruction mlp must be True or False, got '
                             f'{self.mlp!r}')
        try:
            RECONSTRUCTION_LOSSES.get(self.loss)
        except ValueError as err:
            raise ValueError(f'reconstruction loss: {err}') from None

    @property
    def keep_input(self) -> float:
        """The probability that an element of a unit's input is the
        quantized prefix's (``input_prob``, else ``drop_prob``)."""
        return self.drop_prob if self.input_prob is None else self.input_prob

    def beta_at(self, iteration: int) -> float:
        """The regulariser's exponent after ``iteration`` steps (1-based,
        as QDrop counts): ``beta[0]`` during the warm-up, then linear to
        ``beta[1]`` at ``iters``."""
        start, end = self.beta
        decay_from = self.warmup * self.iters
        if iteration < decay_from:
            return start
        progress = (iteration - decay_from) / (self.iters - decay_from)
        return end + (start - end) * max(0.0, 1 - progress)


class AdaRoundQuantizer(UniformQuantizer):
    """AdaRound on the calibrated per-channel grid of ``grid`` for
    ``weight`` (module docstring): soft rounding while ``soft`` (then
    recomputed in every forward pass, with gradients to ``alpha``), hard
    afterwards. :meth:`codes` are the integers the export stores."""

    def __init__(self, grid: UniformQuantizer, weight: torch.Tensor):
        if grid.channel_axis is None or not grid.calibrated:
            raise ValueError(f'{grid.layer_name}: AdaRound needs a calibrated '
                             'per-channel weight quantizer')
        super().__init__(grid.bits, grid.channel_axis, grid.search,
                         grid.keep_zero, grid.symmetric)
        self.layer_name = grid.layer_name
        self.set_params(grid.scale, grid.zero_point)
        rest = weight.detach() / self.params_along(weight)[0]
        rest = rest - torch.floor(rest)  # in [0, 1)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) /
                                             (rest - GAMMA) - 1))
        self.soft = True

    @classmethod
    def restored(cls, like: UniformQuantizer,
                 shape: torch.Size) -> 'AdaRoundQuantizer':
        """An uncalibrated hard quantizer of ``like``'s kind whose grid and
        rounding variables (of ``shape``) a state dict fills."""
        new = cls.__new__(cls)
        UniformQuantizer.__init__(new, like.bits, like.channel_axis,
                                  like.search, like.keep_zero, like.symmetric)
        new.layer_name = like.layer_name
        new.alpha = nn.Parameter(torch.zeros(shape))
        new.soft = False
        return new

    @property
    def trainable(self) -> bool:
        return self.soft

    def finalize(self, weight: torch.Tensor) -> None:
        """The grid is fixed: nothing to search."""

    def rounding(self) -> torch.Tensor:
        """``h(V)`` in [0, 1] (soft) or its hard 0/1 value."""
        if not self.soft:
            return (self.alpha >= 0).to(self.alpha.dtype)
        return ((ZETA - GAMMA) * torch.sigmoid(self.alpha) + GAMMA).clamp(
            0, 1)

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)``."""
        return (1 - (2 * self.rounding() - 1).abs().pow(beta)).sum()

    def _levels(self, w: torch.Tensor) -> torch.Tensor:
        """``clamp(floor(w / s) + h(V) + z, 0, 2^b - 1)``."""
        scale, zero = self.params_along(w)
        return torch.clamp(torch.floor(w.to(scale.dtype) / scale) +
                           self.rounding() + zero, 0, self.levels)

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        return self._levels(w)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        scale, zero = self.params_along(w)
        return (self._levels(w.detach()) - zero) * scale

    def harden(self) -> None:
        self.soft = False

    def extra_repr(self) -> str:
        return super().extra_repr() + (', soft' if self.soft else ', hard')


class _Stop(Exception):
    """Ends a forward pass once the unit's data is recorded."""


def _detached(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(o) for o in obj)
    return obj


def _mix(quantized, full, keep: float, gen: torch.Generator):
    """QDrop's input mix: ``quantized`` elementwise with probability
    ``keep``, ``full`` otherwise (nested structures alike)."""
    if isinstance(quantized, torch.Tensor) and quantized.is_floating_point():
        if keep >= 1:
            return quantized
        mask = torch.rand(quantized.shape, generator=gen) < keep
        return torch.where(mask.to(quantized.device), quantized, full)
    if isinstance(quantized, (list, tuple)):
        return type(quantized)(_mix(q, f, keep, gen)
                               for q, f in zip(quantized, full))
    return quantized


def record(model: nn.Module, unit: nn.Module,
           run: Callable[[nn.Module], object], output: bool = False,
           name: str = 'the reconstruction unit'):
    """``(args, kwargs, output)`` of the first call of ``unit`` when
    ``run(model)`` runs (output None unless ``output``); the forward pass
    stops there."""
    seen = []

    def hook(module, args, kwargs, out=None):
        seen.append((_detached(args), _detached(kwargs), _detached(out)))
        raise _Stop

    handle = (unit.register_forward_hook(hook, with_kwargs=True) if output
              else unit.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run(model)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f'{name} never ran on the calibration images')
    return seen[0]


def _activation_quantizers(unit: nn.Module):
    """(parent, attribute, quantizer) of every calibrated activation
    quantizer of the unit (all but the layers' weight quantizers)."""
    return [(parent, attr, child) for parent in unit.modules()
            for attr, child in parent.named_children()
            if isinstance(child, FakeQuantizer) and attr != 'weight_quantizer'
            and child.state == 'quant']


def _learnable(quantizer: FakeQuantizer) -> bool:
    """A uniform activation quantizer, whose steps are learned
    (learned_step.py)."""
    return isinstance(quantizer, UniformQuantizer) and \
        not quantizer.trainable


def reconstruct_unit(name: str, unit: nn.Module, data: UnitData,
                     cfg: ReconstructionConfig) -> Dict[str, float]:
    """Reconstruct one calibrated unit in place (module docstring, steps
    2-5) from its recorded ``data`` (:class:`~.unit_data.UnitData`: inputs
    of the quantized prefix and of the float model, the float output and,
    for a loss that asks for them, the sensitivity weights). Returns the
    output error (QDrop's lp on the quantized inputs, averaged over the
    reconstruction images: each chunk's weighted by its images) before and
    after, and the share of weights AdaRound rounds up."""
    if cfg.batch_size > data.size:
        raise ValueError(f'reconstruction batch_size {cfg.batch_size} is '
                         f'larger than the {data.size} reconstruction images')
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_fn = RECONSTRUCTION_LOSSES.get(cfg.loss)(p=cfg.p, unit=name)

    def output_error():
        total = 0.
        with torch.no_grad():
            for chunk, size in data:
                args, kwargs = chunk['q']
                total += size * float(lp_channel_loss(
                    unit(*args, **kwargs), chunk['target'], cfg.p))
        return total / data.size

    before = output_error()
    layers = [m for m in unit.modules()
              if isinstance(getattr(m, 'weight_quantizer', None),
                            UniformQuantizer)
              and m.weight_quantizer.channel_axis is not None]
    for layer in layers:
        layer.weight_quantizer = AdaRoundQuantizer(layer.weight_quantizer,
                                                   layer.weight)
    rounders = [layer.weight_quantizer for layer in layers]
    learned = []
    for parent, attr, quantizer in _activation_quantizers(unit):
        if _learnable(quantizer):
            stepped = LearnedStepQuantizer(quantizer)
            setattr(parent, attr, stepped)
            learned.append((parent, attr, stepped))
    if not layers and not learned:
        warnings.warn(f'reconstruction: {name} has no quantized weight or '
                      'learnable step; left as calibrated')
        return dict(loss_before=before, loss_after=before,
                    rounded_up=math.nan)

    def drop(module, args, out):
        return _mix(out, args[0], cfg.drop_prob, gen)

    handles = [q.register_forward_hook(drop)
               for *_, q in _activation_quantizers(unit)]
    w_opt = torch.optim.Adam([r.alpha for r in rounders],
                             lr=cfg.weight_lr) if rounders else None
    a_opt = torch.optim.Adam([stepped.step for *_, stepped in learned],
                             lr=cfg.act_lr) if learned else None
    a_sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        a_opt, T_max=cfg.iters, eta_min=0.) if a_opt else None
    optimizers = [o for o in (w_opt, a_opt) if o is not None]
    in_turn = data.in_turn(cfg.batch_size) if cfg.order == 'in_turn' \
        else None
    try:
        for it in range(1, cfg.iters + 1):
            batch = next(in_turn) if in_turn else \
                data.sample(cfg.batch_size, gen)
            args_q, kwargs = batch['q']
            args = _mix(args_q, batch['fp'][0], cfg.keep_input, gen)
            loss = loss_fn(unit(*args, **kwargs), batch['target'],
                           batch['weight'])
            if it >= cfg.warmup * cfg.iters and rounders:
                beta = cfg.beta_at(it)
                loss = loss + cfg.round_weight * sum(
                    r.regularizer(beta) for r in rounders)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f'reconstruction of {name}: the loss is {float(loss)} '
                    f'at iteration {it}')
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()
            if a_sched is not None:
                a_sched.step()
    finally:
        for handle in handles:
            handle.remove()
    for rounder, layer in zip(rounders, layers):
        rounder.harden()
        layer.cache_weight()
    for parent, attr, stepped in learned:
        setattr(parent, attr, stepped.as_uniform())
    up = sum(float(r.rounding().sum()) for r in rounders)
    total = sum(r.alpha.numel() for r in rounders)
    return dict(loss_before=before, loss_after=output_error(),
                rounded_up=up / total if total else math.nan)


def needs_task_loss(cfg: ReconstructionConfig, units: Sequence[str]) -> bool:
    """Whether ``cfg``'s loss (or its MLP stage) weights some of ``units``
    by a task objective's sensitivity."""
    loss = RECONSTRUCTION_LOSSES.get(cfg.loss)
    return any(loss(p=cfg.p, unit=u).needs_weights() for u in units)


def unit_weights(cfg: ReconstructionConfig, name: str,
                 float_model: nn.Module, float_unit: nn.Module,
                 task_loss: Optional[Callable[[nn.Module], torch.Tensor]]):
    """The sensitivity weights of unit (or MLP) ``name``'s output when
    ``cfg``'s loss asks for them (:func:`reconstruction_losses.
    perturbation_sensitivity` of ``task_loss``, on the images it runs),
    else None."""
    if not needs_task_loss(cfg, [name]):
        return None
    if task_loss is None:
        raise ValueError(
            f'reconstruction loss {cfg.loss!r} weights {name} by a task '
            "objective's sensitivity, and none was given")
    return perturbation_sensitivity(float_model, float_unit, task_loss,
                                    cfg.perturbation)


def reconstruction_units(model: nn.Module,
                         patterns: Sequence[str]) -> List[str]:
    """Names of the modules of ``model`` matching one of ``patterns``
    (full match), in model order, outermost only."""
    names = []
    for name, _ in model.named_modules():
        if any(re.fullmatch(p, name) for p in patterns) and not any(
                name.startswith(n + '.') for n in names):
            names.append(name)
    return names


def record_unit(name: str, float_model: nn.Module, runs: Sequence[Run],
                cfg: ReconstructionConfig,
                task_losses: Optional[Sequence] = None,
                model: Optional[nn.Module] = None) -> UnitData:
    """The data unit (or MLP) ``name`` is reconstructed on, one chunk per
    run of ``runs`` (:class:`~.unit_data.UnitData`, in ``cfg.cache_dir``
    when set): the float model's inputs and output, the quantized
    ``model``'s inputs (when given) and the sensitivity weights
    (:func:`unit_weights`, ``task_losses``: one objective per run)."""
    float_unit = float_model.get_submodule(name)
    data = UnitData(cfg.cache_dir)
    try:
        for k, run in enumerate(runs):
            *fp, target = record(float_model, float_unit, run, output=True,
                                 name=name)
            q = None if model is None else record(
                model, model.get_submodule(name), run, name=name)[:2]
            weight = unit_weights(cfg, name, float_model, float_unit,
                                  None if task_losses is None else
                                  task_losses[k])
            data.add(tuple(fp), target, q, weight)
    except BaseException:
        data.release()
        raise
    return data


def reconstruct(model: nn.Module, float_model: nn.Module, run,
                units: Sequence[str], cfg: ReconstructionConfig,
                progress: Optional[Callable[[int, str, Dict], None]] = None,
                task_loss=None) -> Dict[str, Dict[str, float]]:
    """Reconstruct the calibrated ``model`` unit by unit against
    ``float_model`` (module docstring); ``run(m)`` runs a model on the
    reconstruction images, or ``run`` is a list of such runs, one per chunk
    of them (unit_data.py); ``progress(k, name, stats)`` is called after
    each unit; ``task_loss(float_model)``: the objective whose sensitivity
    weights a loss asks for (reconstruction_losses.py), one per run when
    ``run`` is a list. Returns the stats per unit."""
    model.eval()
    float_model.eval()
    runs = as_runs(run)
    task_losses = None if task_loss is None else as_runs(task_loss)
    stats = {}
    for k, name in enumerate(units):
        with record_unit(name, float_model, runs, cfg, task_losses,
                         model) as data:
            stats[name] = reconstruct_unit(name, model.get_submodule(name),
                                           data, cfg)
        if progress is not None:
            progress(k, name, stats[name])
    return stats
