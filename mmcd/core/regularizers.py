"""The regularizer interface: what CD, S2D and TWEO have in common, so that a
new training-time regularizer is one registered class, and the optim wrapper
(``mmcd.engine.optim_wrappers``) drives any list of them the same way.

Life cycle, driven by the optim wrapper:

1. registered by name (``@REGULARIZERS.register`` on the class, keyed by
   its ``name``), built from its options
   (``build_regularizer(dict(type=NAME, ...))``):
   bad options fail here, at config build time;
2. :meth:`Regularizer.bind` to the model once it is known, with the matrix
   pairs the wrapper discovered (:mod:`mmcd.core.pairs`) and ``lr_of`` (the
   current lr of the param group holding a parameter); bound again after
   the model changes (QAT conversion): state carries over;
3. every training iteration, :meth:`Regularizer.loss` is added to the task
   loss before backward (logged as ``loss_<name>``), and after every real
   optimizer step (not on accumulation-only iterations, nor when AMP's loss
   scaler skips a step) :meth:`Regularizer.after_step` acts on the weights
   and returns scalars to log;
4. :meth:`Regularizer.state_dict` / :meth:`Regularizer.load_state_dict`
   travel in the optim wrapper's state (checkpoints, ``--resume``).

Registered here: ``cd`` (:mod:`.colinearity`), ``s2d``
(:mod:`.spectral_decay`), ``tweo`` (:mod:`.activation_penalty`) and the
planted model ``alignment_growth`` (:mod:`.alignment_growth`). Pure
PyTorch.
"""
import inspect
from typing import Callable, Dict, Optional, Sequence

import torch

from .registry import Registry

LrOf = Callable[[torch.Tensor], float]


class Regularizer:
    """Base class: every hook is a no-op, subclasses override what they
    use. ``name`` is the registered name: the config key (``cd=dict(...)``
    or ``dict(type='cd', ...)``), the log prefix and the state key."""
    name = ''

    def bind(self, model: torch.nn.Module, pairs: Sequence,
             lr_of: LrOf) -> None:
        """Attach to ``model`` and its matrix ``pairs``."""

    def unbind(self) -> None:
        """Detach from the model bound last (remove hooks)."""

    def loss(self) -> Optional[torch.Tensor]:
        """A term added to the task loss for this iteration, or None."""
        return None

    def after_step(self, iteration: int,
                   optimizer_step: int) -> Dict[str, torch.Tensor]:
        """Act after a real optimizer step; ``iteration`` is the 0-based
        training iteration that ends with it, ``optimizer_step`` its 0-based
        optimizer-step index (iteration // accumulative_counts). Returns
        ``{scalar name: 0-d tensor}`` to log (on any device: the wrapper
        copies all of them to the host at once)."""
        return {}

    def describe(self, logged: Dict[str, float]) -> Optional[str]:
        """A warning for the log, given the scalars just logged, or None."""
        return None

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass


#: Regularizer classes by ``name`` (``@REGULARIZERS.register`` on the class).
REGULARIZERS = Registry('regularizer', key_of=lambda cls: cls.name)


def build_regularizer(cfg: Dict) -> Regularizer:
    """The regularizer ``cfg['type']`` built with the other keys of
    ``cfg``. Unknown names and options fail with the registered names or
    the allowed options in the message."""
    cfg = dict(cfg)
    name = cfg.pop('type', None)
    cls = REGULARIZERS.get(name)
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop('self')
    variadic = {p for p, param in params.items() if param.kind in (
        param.VAR_POSITIONAL, param.VAR_KEYWORD)}
    named = {p: param for p, param in params.items() if p not in variadic}
    unknown = sorted(set(cfg) - set(named))
    if unknown and not any(params[p].kind == params[p].VAR_KEYWORD
                           for p in variadic):
        raise ValueError(f'{name}: unknown option(s) {unknown}; allowed: '
                         f'{sorted(named)}')
    missing = [p for p, param in named.items()
               if param.default is param.empty and p not in cfg]
    if missing:
        raise ValueError(f'{name} needs a {missing[0]}, e.g. '
                         f'{name}=dict({missing[0]}=...)')
    return cls(**cfg)
