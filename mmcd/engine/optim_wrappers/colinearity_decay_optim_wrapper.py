"""MMEngine optim wrappers that add Colinearity Decay (and the S2D / TWEO
comparison regularizers, or any registered :class:`~mmcd.core.regularizers.
Regularizer`) to any optimizer.

In a config that inherits an MMDetection config, only the type changes and a
``cd`` dict is added; the optimizer, ``paramwise_cfg``, ``clip_grad`` and
``accumulative_counts`` of the inherited config stay as they are::

    optim_wrapper = dict(type='ColinearityDecayOptimWrapper',
                         cd=dict(strength=0.1))

CD runs after every real optimizer step (not on accumulation-only
iterations, nor when AMP's loss scaler skips the step), scaled by the lr of
each matrix's param group, see
:mod:`mmcd.core.colinearity`. The model is bound when the Runner calls
``initialize_count_status(model, ...)`` at the start of training; that is
where pairs are discovered (see :mod:`mmcd.core.pairs`).

Args (besides those of the wrapped class):
    cd (dict, optional): ``strength`` (lam, required), ``interval`` (run every
        N optimizer steps, the update is multiplied by N so the total decay
        is unchanged), ``begin`` / ``end`` (iterations), ``warmup_iters``
        (linear ramp from ``begin``), ``power_iters`` (spectral norm power
        iterations per step), ``cuda_graph`` (default True: on a GPU, replay
        the step as a CUDA graph); see
        :class:`~mmcd.core.colinearity.ColinearityDecayRegularizer`. None
        disables CD.
    pairs (dict, optional): which pairs the regularizers act on: ``kinds``
        (subset of ``('ffn', 'vo', 'qk')``), ``include`` / ``exclude``
        (regexes on pair names such as ``backbone.stages.0.blocks.1.ffn``),
        ``rules`` (extra :class:`~mmcd.core.pairs.PairRule` dicts),
        ``builtin`` (the architecture specs whose pair rules apply, default
        all registered: ``('swin', 'vit')``, :mod:`mmcd.core.architectures`).
    s2d (dict, optional): Selective Spectral Decay on the pairs' matrices,
        a loss term (through the optimizer, as the S2D paper): ``strength``,
        ``tau``, ``max_rank``, ``svd_interval``, ``power``.
    tweo (dict, optional): activation penalty on the output of the blocks
        that hold the pairs: ``weight``, ``tau``, ``p``.
    regularizers (list of dict, optional): more regularizers by registered
        name, ``dict(type=NAME, **options)``; ``cd=...`` is short for
        ``dict(type='cd', ...)`` here (so are ``s2d`` and ``tweo``). Each
        name at most once.

Logged through the MessageHub (so in the MMEngine log and TensorBoard):
the scalars each regularizer returns after a step (CD:
``cd_align_{kind}_mean`` / ``_max``, see
:func:`mmcd.core.colinearity.alignment`, ``cd_update_norm``,
``cd_skipped_pairs``), and every loss term as ``loss_<name>``
(``loss_s2d``, ``loss_tweo``).
"""
import logging
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.logging import MessageHub, print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from mmcd.core.architectures import ARCHITECTURES, pair_rules
from mmcd.core.pairs import (PAIR_KINDS, PairRule, describe_no_pairs,
                             discover_pairs)
from mmcd.core.regularizers import REGULARIZERS, Regularizer, build_regularizer

from ..model_utils import bare_model

PAIR_KEYS = {'kinds', 'include', 'exclude', 'rules', 'builtin'}


def regularizer_configs(cd: Optional[dict], s2d: Optional[dict],
                        tweo: Optional[dict],
                        regularizers: Optional[Sequence[dict]]
                        ) -> List[dict]:
    """The ``cd`` / ``s2d`` / ``tweo`` shorthands and the ``regularizers``
    list as one list of ``dict(type=NAME, ...)``."""
    configs = [dict(type=name, **options) for name, options in (
        ('cd', cd), ('s2d', s2d), ('tweo', tweo)) if options is not None]
    for cfg in regularizers or ():
        if not isinstance(cfg, dict) or 'type' not in cfg:
            raise ValueError(
                'regularizers: each entry is a dict with a type (one of '
                f'{", ".join(REGULARIZERS.names())}), got {cfg!r}')
        configs.append(dict(cfg))
    names = [cfg['type'] for cfg in configs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f'regularizer(s) {repeated} given twice')
    return configs


class RegularizedOptimWrapperMixin:
    """Drives a list of :class:`~mmcd.core.regularizers.Regularizer`, shared
    by the plain and AMP wrappers (module docstring: options)."""

    def __init__(self, optimizer, cd: Optional[dict] = None,
                 pairs: Optional[dict] = None, s2d: Optional[dict] = None,
                 tweo: Optional[dict] = None,
                 regularizers: Optional[Sequence[dict]] = None, **kwargs):
        super().__init__(optimizer=optimizer, **kwargs)
        configs = regularizer_configs(cd, s2d, tweo, regularizers)
        if not configs:
            raise ValueError(
                f'{type(self).__name__} without cd, s2d, tweo or '
                'regularizers does nothing; use OptimWrapper, or give '
                'cd=dict(strength=...)')
        self.regularizers: List[Regularizer] = [
            build_regularizer(cfg) for cfg in configs]
        self.pairs_cfg = {
            **dict(kinds=PAIR_KINDS, include=(), exclude=(), rules=(),
                   builtin=tuple(ARCHITECTURES.names())),
            **_check_keys('pairs', pairs or {}, PAIR_KEYS)
        }
        try:
            self.pair_rules = pair_rules(self.pairs_cfg['builtin'])
        except ValueError as err:
            raise ValueError(f'pairs.builtin: {err}') from None
        self.pair_rules += [r if isinstance(r, PairRule) else PairRule(**r)
                            for r in self.pairs_cfg['rules']]
        self.matrix_pairs = None
        self._pending_state: Optional[Dict] = None
        # AmpOptimWrapper skips optimizer.step() on inf/NaN gradients; the
        # regularizers must skip that step too, so count the real ones
        self._optimizer_steps = 0
        self.optimizer.register_step_post_hook(self._count_optimizer_step)

    def _count_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._optimizer_steps += 1

    # ---------------------------------------------------------- binding --
    def initialize_count_status(self, model, init_counts: int,
                                max_counts: int) -> None:
        super().initialize_count_status(model, init_counts, max_counts)
        self.bind_model(model)

    def bind_model(self, model: torch.nn.Module) -> None:
        """Discover the pairs of ``model`` and bind the regularizers to it.
        Called by the Runner through ``initialize_count_status``; call it
        yourself when you drive the wrapper without a Runner. Binding again
        (a converted model) keeps the regularizers' state."""
        model = bare_model(model)
        if self.matrix_pairs is not None and self._pending_state is None:
            self._pending_state = self._regularizer_state()  # re-binding
        for regularizer in self.regularizers:
            regularizer.unbind()
        pairs = discover_pairs(model, self.pair_rules, self.pairs_cfg['kinds'],
                               self.pairs_cfg['include'],
                               self.pairs_cfg['exclude'])
        if not pairs:
            raise ValueError(f'{type(self).__name__}: ' + describe_no_pairs(
                model, self.pair_rules, self.pairs_cfg['kinds']))
        self.matrix_pairs = pairs
        counts = {k: sum(p.kind == k for p in pairs) for k in PAIR_KINDS}
        print_log(f'{type(self).__name__}: {len(pairs)} matrix pairs '
                  f'({", ".join(f"{k}: {n}" for k, n in counts.items())}), '
                  'regularizers: '
                  f'{", ".join(r.name for r in self.regularizers)}',
                  logger='current')
        self._group_of = {id(p): i for i, g in
                          enumerate(self.optimizer.param_groups)
                          for p in g['params']}
        for regularizer in self.regularizers:
            regularizer.bind(model, pairs, self._lr_of)
        if self._pending_state is not None:
            self._load_regularizer_state(self._pending_state)
            self._pending_state = None

    def _lr_of(self, param: torch.Tensor) -> float:
        group = self._group_of.get(id(param))
        return 0.0 if group is None else \
            self.optimizer.param_groups[group]['lr']

    # --------------------------------------------------------- training --
    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """The task loss plus the regularizers' loss terms, each scaled like
        the task loss for gradient accumulation and logged."""
        hub = MessageHub.get_current_instance()
        for regularizer in self.regularizers:
            penalty = regularizer.loss()
            if penalty is None:
                continue
            hub.update_scalar(f'train/loss_{regularizer.name}',
                              float(penalty.detach()))
            loss = loss + self.scale_loss(penalty.to(loss.device))
        super().backward(loss, **kwargs)

    def step(self, **kwargs) -> None:
        steps_before = self._optimizer_steps
        super().step(**kwargs)
        if self._optimizer_steps == steps_before:
            return  # the loss scaler skipped the step (inf/NaN gradients)
        if self.matrix_pairs is None:
            raise RuntimeError(
                f'{type(self).__name__}.step() before the model was bound: '
                'the Runner does it in initialize_count_status(); without '
                'a Runner call bind_model(model) first')
        iteration = self._inner_count - 1  # the one being finished
        optimizer_step = iteration // self._accumulative_counts
        scalars = {}
        for regularizer in self.regularizers:
            scalars.update(regularizer.after_step(iteration, optimizer_step))
        self._log(scalars)

    def _log(self, scalars: Dict[str, torch.Tensor]) -> None:
        """Log the regularizers' scalars with one device-to-host copy, and
        their warnings."""
        if not scalars:
            return
        device = next(iter(scalars.values())).device
        values = torch.stack([v.detach().float().reshape(()).to(device)
                              for v in scalars.values()]).tolist()
        logged = dict(zip(scalars, values))
        hub = MessageHub.get_current_instance()
        for name, value in logged.items():
            hub.update_scalar(f'train/{name}', value)
        for regularizer in self.regularizers:
            message = regularizer.describe(logged)
            if message:
                print_log(message, logger='current', level=logging.WARNING)

    # ------------------------------------------------------------ state --
    def _regularizer_state(self) -> Dict:
        return {r.name: r.state_dict() for r in self.regularizers}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state['regularizers'] = self._regularizer_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        regularizers = state_dict.pop('regularizers', None)
        super().load_state_dict(state_dict)
        if regularizers is None:
            return
        if self.matrix_pairs is None:  # resume happens before binding
            self._pending_state = regularizers
        else:
            self._load_regularizer_state(regularizers)

    def _load_regularizer_state(self, states: Dict) -> None:
        for regularizer in self.regularizers:
            if states.get(regularizer.name):
                regularizer.load_state_dict(states[regularizer.name])


def _check_keys(section: str, given: dict, allowed: set) -> dict:
    unknown = set(given) - allowed
    if unknown:
        raise ValueError(f'{section}: unknown option(s) {sorted(unknown)}; '
                         f'allowed: {sorted(allowed)}')
    return dict(given)


@OPTIM_WRAPPERS.register_module()
class ColinearityDecayOptimWrapper(RegularizedOptimWrapperMixin,
                                   OptimWrapper):
    """:class:`~mmengine.optim.OptimWrapper` with Colinearity Decay and any
    other registered regularizers (module docstring: options)."""


@OPTIM_WRAPPERS.register_module()
class ColinearityDecayAmpOptimWrapper(RegularizedOptimWrapperMixin,
                                      AmpOptimWrapper):
    """:class:`~mmengine.optim.AmpOptimWrapper` (CUDA/NPU/MLU mixed
    precision) with Colinearity Decay. ``tools/train.py --amp`` picks it for
    configs that use :class:`ColinearityDecayOptimWrapper`. CD runs on the
    fp32 master weights after the scaled step, and not at all when the
    loss scaler skips the step (inf/NaN gradients)."""
