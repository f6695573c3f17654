"""Quantization-aware training (LSQ / OFQ) as an MMEngine hook.

A config that inherits a (CD) detector config and starts from its trained
checkpoint adds::

    load_from = 'work_dirs/mask-rcnn_swin-t_cd/epoch_12.pth'
    custom_hooks = [dict(type='QuantAwareTrainingHook', w_bits=4, a_bits=4,
                         method='ofq')]

``tools/train.py`` then fine-tunes the quantized model and every validation
evaluates it quantized; ``tools/test.py CONFIG QAT_CHECKPOINT`` tests it.
The optim wrapper is the config's: CD stays on during QAT when the config
has ``ColinearityDecayOptimWrapper`` (to turn it off, inherit the baseline
config or replace the wrapper with ``dict(_delete_=True, type=
'OptimWrapper', ...)``).

What happens when (:mod:`mmcd.core.quant.qat` does the work):

* ``before_run`` (priority ABOVE_NORMAL, before EMAHook copies the model):
  the model is converted for QAT (:func:`prepare_qat`), quantizers off, so
  that the checkpoint of a QAT run, loaded right after, restores steps,
  offsets, reparameterized weights and CGA state (``--resume``,
  ``tools/test.py``). In training, the optim wrapper and the parameter
  schedulers are rebuilt from the config so that they hold the new
  quantizer parameters (without weight decay), and a distributed model is
  re-wrapped.
* ``before_train``: unless a QAT checkpoint was resumed, the quantizers are
  initialised by the PTQ calibration of ``init`` (default RepQ-ViT) on
  ``calib.num_images`` training images (test pipeline), then switched on.
* every iteration: after the update, CGA-frozen weights are written back;
  the oscillation fraction (weights whose level changed at least once in
  the last ``oscillation_window`` iterations) is logged as
  ``qat_oscillation`` (and once more for the last, partial window at the
  end of training); from ``cga.begin`` (a fraction of the training
  iterations) on, before every iteration the confident weights are
  decided anew and frozen for that update, and the frozen fraction is
  logged as ``qat_cga_frozen``.
* ``before_val_epoch`` / ``before_test_epoch``: quantizers on (after a
  checkpoint load their on/off state, which is not stored, is restored);
  a float checkpoint fails here with a clear error.
"""
import copy
from typing import Dict, Optional, Sequence

from mmengine.dist import broadcast
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import HOOKS

from mmcd.core.quant.qat import (OscillationTracker, QATConfig,
                                 activate_qat,
                                 freeze_confident_weights, initialize_qat,
                                 prepare_qat, restore_frozen_weights,
                                 trainable_weight_layers)
from ..calibration import CalibrationOptions, calibrate_on

#: substring of every quantizer parameter name (``...input_quantizer.step``)
QUANTIZER_KEY = 'quantizer.'


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


@HOOKS.register_module()
class QuantAwareTrainingHook(Hook):
    """Fine-tune the model with fake quantization (module docstring).

    Args:
        w_bits, a_bits: 2..8.
        method: ``'ofq'`` (StatsQ weights, query-key reparameterization,
            CGA) or ``'lsq'`` (LSQ weights).
        init: PTQ method of the initial calibration (``'repq-vit'``,
            ``'dopq-vit'`` or ``'minmax'``).
        calib: ``num_images`` (32), ``dataloader``, ``seed`` (0), as in
            :class:`PostTrainingQuantHook`.
        qk_reparam: quantize ``W_Q^T W_K`` (default: on for ``'ofq'``).
        cga: confidence-guided annealing, ``dict(begin=0.9,
            boundary_range=0.005)``: from ``begin`` (fraction of the
            training iterations) on, only weights within ``boundary_range``
            steps of a rounding boundary train. Default: on for ``'ofq'``,
            off for ``'lsq'``; ``cga=None`` turns it off.
        oscillation_window: iterations per oscillation measurement; 0
            turns it off.
        scope, skip, first_layer_bits: see :class:`QuantConfig`.
    """
    priority = 'ABOVE_NORMAL'  # convert before EMAHook copies the model

    def __init__(self, w_bits: int = 4, a_bits: int = 4,
                 method: str = 'ofq', init: str = 'repq-vit',
                 calib: Optional[Dict] = None,
                 qk_reparam: Optional[bool] = None, cga='default',
                 oscillation_window: int = 50, scope: str = 'all',
                 skip: Sequence[str] = (), first_layer_bits: int = 8):
        self.qat_cfg = QATConfig(w_bits, a_bits, method, init, qk_reparam,
                                 scope, tuple(skip), first_layer_bits)
        self.calib = CalibrationOptions.from_dict(calib)
        if cga == 'default':
            cga = self.qat_cfg.spec.cga
        self.cga = None
        if cga is not None:
            cga = dict(cga)
            unknown = set(cga) - {'begin', 'boundary_range'}
            if unknown:
                raise ValueError(f'cga: unknown option(s) {sorted(unknown)}')
            self.cga = dict(begin=float(cga.get('begin', 0.9)),
                            boundary_range=float(
                                cga.get('boundary_range', 0.005)))
            if not 0 <= self.cga['begin'] < 1:
                raise ValueError('cga.begin is a fraction of the training '
                                 f'iterations in [0, 1), got '
                                 f'{self.cga["begin"]}')
            if not 0 < self.cga['boundary_range'] < 0.5:
                raise ValueError('cga.boundary_range must be in (0, 0.5) '
                                 f'(steps), got {self.cga["boundary_range"]}')
        if oscillation_window < 0:
            raise ValueError('oscillation_window must be >= 0, got '
                             f'{oscillation_window}')
        self.oscillation_window = oscillation_window
        self._tracker = None
        self._annealing = False

    # -------------------------------------------------------- conversion --
    def before_run(self, runner) -> None:
        model = _unwrap(runner.model)
        if trainable_weight_layers(model):
            return  # converted by an earlier run of this runner
        device = next(model.parameters()).device
        summary = prepare_qat(model, self.qat_cfg)
        model.to(device)
        cfg = self.qat_cfg
        print_log(f'QAT: W{cfg.w_bits}A{cfg.a_bits} {cfg.method} '
                  f'({cfg.weight_quantizer} weights, init {cfg.init}): '
                  f'{summary}', logger='current')
        if isinstance(runner.optim_wrapper, (OptimWrapper, OptimWrapperDict)):
            self._rebuild_optimization(runner)

    def _rebuild_optimization(self, runner) -> None:
        """New optimizer (holding the quantizer parameters) and schedulers,
        built from the config as ``Runner.train`` built the first ones."""
        if is_model_wrapper(runner.model):
            runner.model = runner.wrap_model(
                runner.cfg.get('model_wrapper_cfg'), runner.model.module)
        optim_cfg = copy.deepcopy(runner.cfg.optim_wrapper)
        if optim_cfg.get('constructor', 'DefaultOptimWrapperConstructor') \
                == 'DefaultOptimWrapperConstructor':
            paramwise = optim_cfg.setdefault('paramwise_cfg', {})
            paramwise.setdefault('custom_keys', {}).setdefault(
                QUANTIZER_KEY, dict(decay_mult=0.0))
        runner.optim_wrapper = runner.build_optim_wrapper(optim_cfg)
        scheduler_cfg = copy.deepcopy(runner.cfg.get('param_scheduler'))
        runner.param_schedulers = scheduler_cfg
        runner.scale_lr(runner.optim_wrapper, runner.auto_scale_lr)
        if scheduler_cfg is not None:
            runner.param_schedulers = runner.build_param_scheduler(
                scheduler_cfg)

    # --------------------------------------------------------- training --
    def before_train(self, runner) -> None:
        model = _unwrap(runner.model)
        if not any(m.weight_quantizer.calibrated
                   for m in trainable_weight_layers(model)):
            if runner.cfg.get('load_from') is None:
                print_log('QAT starts from the initial weights (no '
                          'load_from): QAT is meant to fine-tune a trained '
                          'model', logger='current', level=30)
            calibrate_on(model, self.qat_cfg, self.calib.loader(runner.cfg),
                         what='QAT', calibrate_fn=initialize_qat)
            # every rank calibrated on the same images; rank 0's result
            # makes the ranks identical to the last bit
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    broadcast(tensor, 0)
        activate_qat(model)
        model.train()
        if self.oscillation_window:
            self._tracker = OscillationTracker(model)

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if self.cga is None:
            return
        begin = int(self.cga['begin'] * runner.max_iters)
        if runner.iter < begin:
            return
        counts = freeze_confident_weights(_unwrap(runner.model),
                                          self.cga['boundary_range'])
        fraction = float(counts['frozen']) / counts['total']
        if runner.iter == begin or not self._annealing:
            print_log(f'QAT: confidence-guided annealing from iteration '
                      f'{runner.iter}: the confident weights, now '
                      f'{fraction:.1%} of {counts["total"]}, are decided '
                      'anew and frozen at every iteration',
                      logger='current')
        self._annealing = True
        runner.message_hub.update_scalar('train/qat_cga_frozen', fraction)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        model = _unwrap(runner.model)
        if self.cga is not None:
            restore_frozen_weights(model)
        if self._tracker is not None:
            self._tracker.update()
            if (runner.iter + 1) % self.oscillation_window == 0:
                runner.message_hub.update_scalar(
                    'train/qat_oscillation', self._tracker.pop_fraction())

    def after_train(self, runner) -> None:
        if self._tracker is not None and self._tracker.steps:
            # the last, partial window
            runner.message_hub.update_scalar(
                'train/qat_oscillation', self._tracker.pop_fraction())

    # ------------------------------------------------------- evaluation --
    def before_val_epoch(self, runner) -> None:
        activate_qat(_unwrap(runner.model))

    def before_test_epoch(self, runner) -> None:
        activate_qat(_unwrap(runner.model))
