"""MMEngine optim wrappers that add Colinearity Decay (and the S2D / TWEO
comparison regularizers) to any optimizer.

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
        the step as a CUDA graph). None disables CD.
    pairs (dict, optional): which pairs the regularizers act on: ``kinds``
        (subset of ``('ffn', 'vo', 'qk')``), ``include`` / ``exclude``
        (regexes on pair names such as ``backbone.stages.0.blocks.1.ffn``),
        ``rules`` (extra :class:`~mmcd.core.pairs.PairRule` dicts),
        ``builtin`` (built-in rule sets, default ``('swin', 'vit')``).
    s2d (dict, optional): Selective Spectral Decay on the pairs' matrices,
        a loss term (through the optimizer, as the S2D paper): ``strength``,
        ``tau``, ``max_rank``, ``svd_interval``, ``power``.
    tweo (dict, optional): activation penalty on the output of the blocks
        that hold the pairs: ``weight``, ``tau``, ``p``.

Logged through the MessageHub on each CD step (so in the MMEngine log and
TensorBoard): ``cd_align_{kind}_mean`` / ``_max`` (see
:func:`mmcd.core.colinearity.alignment`), ``cd_update_norm``; plus
``loss_s2d`` and ``loss_tweo`` when enabled.
"""
import logging
import math
from typing import Dict, Optional

import torch
from mmengine.logging import MessageHub, print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from mmcd.core.activation_penalty import ActivationPenalty
from mmcd.core.colinearity import ColinearityDecay
from mmcd.core.pairs import (BUILTIN_RULES, PAIR_KINDS, PairRule,
                             describe_no_pairs, discover_pairs)
from mmcd.core.spectral_decay import SelectiveSpectralDecay

CD_KEYS = {'strength', 'interval', 'begin', 'end', 'warmup_iters',
           'power_iters', 'cuda_graph'}
PAIR_KEYS = {'kinds', 'include', 'exclude', 'rules', 'builtin'}


def _check_keys(section: str, given: dict, allowed: set) -> dict:
    unknown = set(given) - allowed
    if unknown:
        raise ValueError(f'{section}: unknown option(s) {sorted(unknown)}; '
                         f'allowed: {sorted(allowed)}')
    return dict(given)


class ColinearityDecayMixin:
    """The regularizer logic, shared by the plain and AMP wrappers."""

    def _setup_regularizers(self, cd: Optional[dict], pairs: Optional[dict],
                            s2d: Optional[dict], tweo: Optional[dict]):
        if cd is None and s2d is None and tweo is None:
            raise ValueError(
                f'{type(self).__name__} without cd, s2d or tweo does '
                'nothing; use OptimWrapper, or give cd=dict(strength=...)')
        self.cd_cfg = None
        if cd is not None:
            cd = _check_keys('cd', cd, CD_KEYS)
            if 'strength' not in cd:
                raise ValueError('cd needs a strength, e.g. '
                                 'cd=dict(strength=0.1)')
            self.cd_cfg = {**dict(interval=1, begin=0, end=None,
                                  warmup_iters=0, power_iters=1,
                                  cuda_graph=True), **cd}
            if not self.cd_cfg['strength'] >= 0:
                raise ValueError('cd strength must be >= 0, got '
                                 f'{self.cd_cfg["strength"]}')
            if self.cd_cfg['interval'] < 1:
                raise ValueError('cd interval must be >= 1')
        self.pairs_cfg = {
            **dict(kinds=PAIR_KINDS, include=(), exclude=(), rules=(),
                   builtin=tuple(BUILTIN_RULES)),
            **_check_keys('pairs', pairs or {}, PAIR_KEYS)
        }
        unknown = set(self.pairs_cfg['builtin']) - set(BUILTIN_RULES)
        if unknown:
            raise ValueError(f'pairs.builtin: unknown rule sets '
                             f'{sorted(unknown)}; known: '
                             f'{sorted(BUILTIN_RULES)}')
        self.pair_rules = [r for name in self.pairs_cfg['builtin']
                           for r in BUILTIN_RULES[name]]
        self.pair_rules += [r if isinstance(r, PairRule) else PairRule(**r)
                            for r in self.pairs_cfg['rules']]
        if s2d is not None:  # bad options fail now, not at training start
            try:
                SelectiveSpectralDecay([], **s2d)
            except TypeError as err:
                raise ValueError(f's2d: {err}') from None
        self.s2d_cfg, self.tweo_cfg = s2d, tweo
        self.matrix_pairs = None
        self.colinearity_decay = self.spectral_decay = None
        self.activation_penalty = None
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
        """Discover the pairs of ``model`` and build the regularizers. Called
        by the Runner through ``initialize_count_status``; call it yourself
        when you drive the wrapper without a Runner."""
        if is_model_wrapper(model):
            model = model.module
        if self.matrix_pairs is not None and self._pending_state is None:
            self._pending_state = self._regularizer_state()  # re-binding
        if self.activation_penalty is not None:
            self.activation_penalty.remove()
        pairs = discover_pairs(model, self.pair_rules, self.pairs_cfg['kinds'],
                               self.pairs_cfg['include'],
                               self.pairs_cfg['exclude'])
        if not pairs:
            raise ValueError(f'{type(self).__name__}: ' + describe_no_pairs(
                model, self.pair_rules, self.pairs_cfg['kinds']))
        self.matrix_pairs = pairs
        counts = {k: sum(p.kind == k for p in pairs) for k in PAIR_KINDS}
        print_log(f'{type(self).__name__}: {len(pairs)} matrix pairs '
                  f'({", ".join(f"{k}: {n}" for k, n in counts.items())})',
                  logger='current')
        self._group_of = {id(p): i for i, g in
                          enumerate(self.optimizer.param_groups)
                          for p in g['params']}
        if self.cd_cfg is not None:
            self.colinearity_decay = ColinearityDecay(
                pairs, self.cd_cfg['strength'], self.cd_cfg['power_iters'],
                self.cd_cfg['cuda_graph'])
        if self.s2d_cfg is not None:
            weights = list({id(w): w for p in pairs
                            for w in p.parameters}.values())
            self.spectral_decay = SelectiveSpectralDecay(weights,
                                                         **self.s2d_cfg)
        if self.tweo_cfg is not None:
            modules = dict(model.named_modules())
            blocks = {p.name.rsplit('.', 1)[0] for p in pairs}
            self.activation_penalty = ActivationPenalty(
                [modules[b] for b in sorted(blocks) if b in modules],
                **self.tweo_cfg)
        if self._pending_state is not None:
            self._load_regularizer_state(self._pending_state)
            self._pending_state = None

    def _lr_of(self, param: torch.Tensor) -> float:
        group = self._group_of.get(id(param))
        return 0.0 if group is None else \
            self.optimizer.param_groups[group]['lr']

    # --------------------------------------------------------- training --
    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """The task loss plus the loss-term regularizers (TWEO, S2D), each
        scaled like the task loss for gradient accumulation and logged."""
        penalties = {}
        if self.activation_penalty is not None:
            penalties['loss_tweo'] = self.activation_penalty.pop_loss()
        if self.spectral_decay is not None:
            penalties['loss_s2d'] = self.spectral_decay.penalty()
        hub = MessageHub.get_current_instance()
        for name, penalty in penalties.items():
            hub.update_scalar(f'train/{name}', float(penalty.detach()))
            loss = loss + self.scale_loss(penalty.to(loss.device))
        super().backward(loss, **kwargs)

    def cd_multiplier(self) -> float:
        """Warm-up / window / interval factor of the CD update at the
        current iteration (0 means: no CD at this step)."""
        cfg = self.cd_cfg
        cur = self._inner_count - 1  # iteration being finished (0-based)
        end = cfg['end'] if cfg['end'] is not None else math.inf
        if not cfg['begin'] <= cur < end:
            return 0.0
        if (cur // self._accumulative_counts) % cfg['interval']:
            return 0.0
        ramp = 1.0
        if cfg['warmup_iters'] > 0:
            ramp = min(1.0, (cur - cfg['begin'] + 1) / cfg['warmup_iters'])
        return ramp * cfg['interval']

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
        hub = MessageHub.get_current_instance()
        if self.colinearity_decay is not None:
            multiplier = self.cd_multiplier()
            if multiplier > 0:
                self._log_cd(hub, self.colinearity_decay.step(
                    self._lr_of, multiplier))
        if self.spectral_decay is not None:
            self.spectral_decay.step_done()  # counts towards the SVD refresh

    @staticmethod
    def _log_cd(hub: MessageHub, stats: Dict) -> None:
        """Log CD's stats with a single device-to-host copy."""
        kinds = sorted(stats['alignment'])
        summary = [stats['update_sq'].sqrt()]
        for kind in kinds:
            align = stats['alignment'][kind].float()
            summary += [align.mean(), align.max()]
        values = torch.cat([torch.stack(summary).float(),
                            stats['finite'].float()]).tolist()
        hub.update_scalar('train/cd_update_norm', values[0])
        for i, kind in enumerate(kinds):
            hub.update_scalar(f'train/cd_align_{kind}_mean', values[1 + 2 * i])
            hub.update_scalar(f'train/cd_align_{kind}_max', values[2 + 2 * i])
        flags = values[1 + 2 * len(kinds):]
        skipped = [n for n, ok in zip(stats['names'], flags) if not ok]
        if skipped:
            print_log(
                'Colinearity decay skipped pairs with non-finite values '
                f'(left unchanged): {", ".join(skipped)}',
                logger='current', level=logging.WARNING)

    # ------------------------------------------------------------ state --
    def _regularizer_state(self) -> Dict:
        regularizers = {}
        if self.colinearity_decay is not None:
            regularizers['cd'] = self.colinearity_decay.state_dict()
        if self.spectral_decay is not None:
            regularizers['s2d'] = self.spectral_decay.state_dict()
        return regularizers

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

    def _load_regularizer_state(self, regularizers: Dict) -> None:
        if self.colinearity_decay is not None and 'cd' in regularizers:
            self.colinearity_decay.load_state_dict(regularizers['cd'])
        if self.spectral_decay is not None and 's2d' in regularizers:
            self.spectral_decay.load_state_dict(regularizers['s2d'])


@OPTIM_WRAPPERS.register_module()
class ColinearityDecayOptimWrapper(ColinearityDecayMixin, OptimWrapper):
    """:class:`~mmengine.optim.OptimWrapper` with Colinearity Decay (module
    docstring: options and formula)."""

    def __init__(self, optimizer, cd: Optional[dict] = None,
                 pairs: Optional[dict] = None, s2d: Optional[dict] = None,
                 tweo: Optional[dict] = None, **kwargs):
        super().__init__(optimizer=optimizer, **kwargs)
        self._setup_regularizers(cd, pairs, s2d, tweo)


@OPTIM_WRAPPERS.register_module()
class ColinearityDecayAmpOptimWrapper(ColinearityDecayMixin,
                                      AmpOptimWrapper):
    """:class:`~mmengine.optim.AmpOptimWrapper` (CUDA/NPU/MLU mixed
    precision) with Colinearity Decay. ``tools/train.py --amp`` picks it for
    configs that use :class:`ColinearityDecayOptimWrapper`. CD runs on the
    fp32 master weights after the scaled step, and not at all when the
    loss scaler skips the step (inf/NaN gradients)."""

    def __init__(self, optimizer, cd: Optional[dict] = None,
                 pairs: Optional[dict] = None, s2d: Optional[dict] = None,
                 tweo: Optional[dict] = None, **kwargs):
        super().__init__(optimizer=optimizer, **kwargs)
        self._setup_regularizers(cd, pairs, s2d, tweo)
