"""Quantization-aware training (LSQ / OFQ) as an MMEngine hook.

A config that inherits a (CD) detector config and starts from its trained
checkpoint converts the model when it is built (``QATDetector``,
:mod:`mmcd.models.qat_detector`) and adds the hook::

    load_from = 'work_dirs/mask-rcnn_swin-t_cd/epoch_12.pth'
    model = dict(_delete_=True, type='QATDetector', detector={{_base_.model}},
                 qat=dict(w_bits=4, a_bits=4, method='ofq'))
    custom_hooks = [dict(type='QuantAwareTrainingHook',
                         calib=dict(num_images=32))]

``tools/train.py`` then fine-tunes the quantized model and every validation
evaluates it quantized; ``tools/test.py CONFIG QAT_CHECKPOINT`` tests it.
The optimizer is built once by the Runner, from the config, over the
converted model: the quantizers' steps and offsets need no weight decay
(``paramwise_cfg.custom_keys={'quantizer.': dict(decay_mult=0.)}``, or
LayerDecayOptimWrapperConstructor, which exempts 0-d and 1-d parameters);
the hook checks it. The optim wrapper is the config's: CD stays on during
QAT when the config has ``ColinearityDecayOptimWrapper``.

What happens when (:mod:`mmcd.core.quant.qat` does the work):

* ``before_train``: unless a QAT checkpoint was resumed, the quantizers are
  initialised by the PTQ calibration of the model's ``qat.init`` (default
  RepQ-ViT) on ``calib.num_images`` training images (test pipeline), the
  ranks of a distributed run made identical, then switched on.
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
from typing import Dict, Optional

from mmengine.dist import broadcast
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.registry import HOOKS

from mmcd.core.quant.qat import (OscillationTracker, activate_qat,
                                 freeze_confident_weights, initialize_qat,
                                 restore_frozen_weights,
                                 trainable_weight_layers)
from ..calibration import CalibrationOptions, calibrate_on

#: substring of every quantizer parameter name (``...input_quantizer.step``)
QUANTIZER_KEY = 'quantizer.'


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


#: the settings of the conversion, given to ``QATDetector`` (the model)
MODEL_SETTINGS = ('w_bits', 'a_bits', 'method', 'init', 'qk_reparam',
                  'scope', 'skip', 'first_layer_bits')


@HOOKS.register_module()
class QuantAwareTrainingHook(Hook):
    """Fine-tune a ``QATDetector`` with fake quantization (module
    docstring).

    Args:
        calib: ``num_images`` (32), ``dataloader``, ``seed`` (0), as in
            :class:`PostTrainingQuantHook`.
        cga: confidence-guided annealing, ``dict(begin=0.9,
            boundary_range=0.005)``: from ``begin`` (fraction of the
            training iterations) on, only weights within ``boundary_range``
            steps of a rounding boundary train. Default: the QAT method's
            (on for ``'ofq'``, off for ``'lsq'``); ``cga=None`` turns it off.
        oscillation_window: iterations per oscillation measurement; 0
            turns it off.
    """
    priority = 'ABOVE_NORMAL'  # calibrate before EMAHook's first update

    def __init__(self, calib: Optional[Dict] = None, cga='default',
                 oscillation_window: int = 50, **model_settings):
        moved = sorted(set(model_settings) & set(MODEL_SETTINGS))
        if moved:
            raise ValueError(
                f'QuantAwareTrainingHook: {", ".join(moved)} belong to the '
                "model now: model = dict(_delete_=True, type='QATDetector', "
                'detector={{_base_.model}}, qat=dict('
                f'{moved[0]}=...)) (mmcd.models.qat_detector)')
        if model_settings:
            raise ValueError('QuantAwareTrainingHook: unknown option(s) '
                             f'{sorted(model_settings)}')
        self.calib = CalibrationOptions.from_dict(calib)
        self.cga = cga if cga == 'default' else _check_cga(cga)
        if oscillation_window < 0:
            raise ValueError('oscillation_window must be >= 0, got '
                             f'{oscillation_window}')
        self.oscillation_window = oscillation_window
        self.qat_cfg = None
        self._tracker = None
        self._annealing = False

    def before_run(self, runner) -> None:
        model = _unwrap(runner.model)
        self.qat_cfg = getattr(model, 'qat_config', None)
        if self.qat_cfg is None or not trainable_weight_layers(model):
            raise ValueError(
                'QuantAwareTrainingHook needs a model converted for QAT: '
                "model = dict(_delete_=True, type='QATDetector', "
                'detector={{_base_.model}}, qat=dict(w_bits=4, a_bits=4, '
                "method='ofq'))")
        if self.cga == 'default':
            self.cga = _check_cga(self.qat_cfg.spec.cga)
        if isinstance(runner.optim_wrapper, OptimWrapper):
            _check_no_quantizer_decay(model, runner.optim_wrapper)

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


def _check_cga(cga: Optional[Dict]) -> Optional[Dict]:
    if cga is None:
        return None
    unknown = set(cga) - {'begin', 'boundary_range'}
    if unknown:
        raise ValueError(f'cga: unknown option(s) {sorted(unknown)}')
    cga = dict(begin=float(cga.get('begin', 0.9)),
               boundary_range=float(cga.get('boundary_range', 0.005)))
    if not 0 <= cga['begin'] < 1:
        raise ValueError('cga.begin is a fraction of the training '
                         f'iterations in [0, 1), got {cga["begin"]}')
    if not 0 < cga['boundary_range'] < 0.5:
        raise ValueError('cga.boundary_range must be in (0, 0.5) '
                         f'(steps), got {cga["boundary_range"]}')
    return cga


def _check_no_quantizer_decay(model, optim_wrapper: OptimWrapper) -> None:
    """Weight decay would shrink the learned steps towards 0: refuse it."""
    decayed = {id(p) for group in optim_wrapper.optimizer.param_groups
               if group.get('weight_decay', 0) > 0 for p in group['params']}
    names = [n for n, p in model.named_parameters()
             if QUANTIZER_KEY in n and id(p) in decayed]
    if names:
        raise ValueError(
            f'{len(names)} quantizer parameter(s) (e.g. {names[0]}) get '
            'weight decay, which shrinks the learned steps: add '
            "paramwise_cfg=dict(custom_keys={'quantizer.': "
            'dict(decay_mult=0.)}) to the optim_wrapper')
