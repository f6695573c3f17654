"""Quantization-aware training (LSQ / OFQ) as an MMEngine hook.

A config that inherits a (CD) detector config and starts from its trained
checkpoint converts the model when it is built (``QATDetector``,
:mod:`mmcd.models.qat_detector`) and adds the hook::

    load_from = 'work_dirs/mask-rcnn_swin-t_cd/epoch_12.pth'
    model = dict(_delete_=True, type='QATDetector', detector={{_base_.model}},
                 qat=dict(w_bits=4, a_bits=4, method='ofq'))
    custom_hooks = [
        dict(type='QuantAwareTrainingHook', calib=dict(num_images=32)),
        dict(type='ConfidenceGuidedAnnealingHook', begin=0.9),  # OFQ
        dict(type='QuantOscillationHook', window=50)]

``tools/train.py`` then fine-tunes the quantized model and every validation
evaluates it quantized; ``tools/test.py CONFIG QAT_CHECKPOINT`` tests it.
The optimizer is built once by the Runner, from the config, over the
converted model: the quantizers' steps and offsets need no weight decay
(``paramwise_cfg.custom_keys={'quantizer.': dict(decay_mult=0.)}``, or
LayerDecayOptimWrapperConstructor, which exempts 0-d and 1-d parameters);
the hook checks it. The optim wrapper is the config's: CD stays on during
QAT when the config has ``ColinearityDecayOptimWrapper``.

Three hooks, each doing one thing (:mod:`mmcd.core.quant.qat` does the
work):

* :class:`QuantAwareTrainingHook`: at ``before_train``, unless a QAT
  checkpoint was resumed, the PTQ calibration of the model's ``qat.init``
  (default RepQ-ViT) on ``calib.num_images`` training images (test
  pipeline) initialises the quantizers, the ranks of a distributed run are
  made identical, and quantization is switched on; before every val/test
  epoch it is switched on again (the on/off state is not stored; a float
  checkpoint fails there with a clear error).
* :class:`ConfidenceGuidedAnnealingHook` (OFQ's CGA): from ``begin`` (a
  fraction of the training iterations) on, the confident weights are decided
  anew and frozen before every iteration and written back after the update;
  logs ``qat_cga_frozen``.
* :class:`QuantOscillationHook`: logs ``qat_oscillation``, the fraction of
  weights whose level changed at least once in the last ``window``
  iterations (and the last, partial window at the end).
"""
from typing import Dict, Optional

from mmengine.dist import broadcast
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from mmengine.registry import HOOKS

from mmcd.core.quant.qat import (OscillationTracker, activate_qat,
                                 freeze_confident_weights, initialize_qat,
                                 mask_frozen_gradients, restore_frozen_weights,
                                 trainable_weight_layers)

from ..calibration import CalibrationOptions, calibrate_on
from ..model_utils import bare_model

#: substring of every quantizer parameter name (``...input_quantizer.step``)
QUANTIZER_KEY = 'quantizer.'


#: the settings of the conversion, given to ``QATDetector`` (the model)
MODEL_SETTINGS = ('w_bits', 'a_bits', 'method', 'init', 'qk_reparam',
                  'scope', 'skip', 'first_layer_bits')


@HOOKS.register_module()
class QuantAwareTrainingHook(Hook):
    """Calibrate a ``QATDetector`` before fine-tuning and keep its
    quantizers on for validation and testing (module docstring).

    Args:
        calib: ``num_images`` (32), ``dataloader``, ``seed`` (0), as in
            :class:`PostTrainingQuantHook`.
    """
    priority = 'ABOVE_NORMAL'  # calibrate before EMAHook's first update

    def __init__(self, calib: Optional[Dict] = None, **moved_settings):
        _refuse_moved('QuantAwareTrainingHook', moved_settings)
        self.calib = CalibrationOptions.from_dict(calib)
        self.qat_cfg = None

    def before_run(self, runner) -> None:
        model = _qat_model(runner, 'QuantAwareTrainingHook')
        self.qat_cfg = model.qat_config
        if self.qat_cfg.qat_method.cga is not None and not any(
                isinstance(h, ConfidenceGuidedAnnealingHook)
                for h in runner.hooks):
            options = ''.join(f', {k}={v}'
                              for k, v in self.qat_cfg.qat_method.cga.items())
            print_log(f'QAT method {self.qat_cfg.method!r} anneals (CGA) but '
                      'the config has no ConfidenceGuidedAnnealingHook: '
                      'training without annealing; add dict(type='
                      f"'ConfidenceGuidedAnnealingHook'{options}) for the "
                      'method as published', logger='current', level=30)
        if isinstance(runner.optim_wrapper, OptimWrapper):
            _check_no_quantizer_decay(model, runner.optim_wrapper)

    def before_train(self, runner) -> None:
        model = bare_model(runner.model)
        if not any(m.weight_quantizer.calibrated
                   for m in trainable_weight_layers(model)):
            if runner.cfg.get('load_from') is None:
                print_log('QAT starts from the initial weights (no '
                          'load_from): QAT is meant to fine-tune a trained '
                          'model', logger='current', level=30)
            calibrate_on(model, self.qat_cfg, self.calib.batch(runner.cfg),
                         what='QAT', calibrate_fn=initialize_qat)
            # every rank calibrated on the same images; rank 0's result
            # makes the ranks identical to the last bit
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    broadcast(tensor, 0)
        activate_qat(model)
        model.train()

    def before_val_epoch(self, runner) -> None:
        activate_qat(bare_model(runner.model))

    def before_test_epoch(self, runner) -> None:
        activate_qat(bare_model(runner.model))


@HOOKS.register_module()
class ConfidenceGuidedAnnealingHook(Hook):
    """OFQ's confidence-guided annealing: from ``begin`` (a fraction of the
    training iterations) on, before every iteration the weights at least
    ``boundary_range`` steps from a rounding boundary are decided anew and
    frozen for that update (their gradients zeroed as they accumulate, their
    values written back after the update, as OFQ does); logs the frozen
    fraction as ``qat_cga_frozen``. Defaults: OFQ's (``begin=0.9``,
    ``boundary_range=0.005``)."""
    priority = 'NORMAL'

    def __init__(self, begin: float = 0.9, boundary_range: float = 0.005):
        if not 0 <= begin < 1:
            raise ValueError('ConfidenceGuidedAnnealingHook: begin is a '
                             'fraction of the training iterations in [0, '
                             f'1), got {begin}')
        if not 0 < boundary_range < 0.5:
            raise ValueError('ConfidenceGuidedAnnealingHook: boundary_range '
                             f'must be in (0, 0.5) (steps), got '
                             f'{boundary_range}')
        self.begin, self.boundary_range = float(begin), float(boundary_range)
        self._annealing = False
        self._gradient_hooks = []

    def before_run(self, runner) -> None:
        _qat_model(runner, 'ConfidenceGuidedAnnealingHook')

    def before_train(self, runner) -> None:
        # frozen weights' gradients are zeroed as they accumulate (OFQ)
        self._gradient_hooks = mask_frozen_gradients(bare_model(runner.model))

    def after_train(self, runner) -> None:
        for handle in self._gradient_hooks:
            handle.remove()
        self._gradient_hooks = []

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if runner.iter < int(self.begin * runner.max_iters):
            return
        counts = freeze_confident_weights(bare_model(runner.model),
                                          self.boundary_range)
        fraction = float(counts['frozen']) / counts['total']
        if not self._annealing:
            print_log(f'QAT: confidence-guided annealing from iteration '
                      f'{runner.iter}: the confident weights, now '
                      f'{fraction:.1%} of {counts["total"]}, are decided '
                      'anew and frozen at every iteration',
                      logger='current')
        self._annealing = True
        runner.message_hub.update_scalar('train/qat_cga_frozen', fraction)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        if self._annealing:
            restore_frozen_weights(bare_model(runner.model))


@HOOKS.register_module()
class QuantOscillationHook(Hook):
    """Logs ``qat_oscillation``: the fraction of quantized weights whose
    integer level changed at least once over the last ``window``
    iterations (and once more for the last, partial window)."""
    priority = 'BELOW_NORMAL'  # after QuantAwareTrainingHook calibrated

    def __init__(self, window: int = 50):
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f'window must be an integer >= 1, got {window!r}')
        self.window = window
        self._tracker = None

    def before_run(self, runner) -> None:
        _qat_model(runner, 'QuantOscillationHook')

    def before_train(self, runner) -> None:
        self._tracker = OscillationTracker(bare_model(runner.model))

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        self._tracker.update()
        if (runner.iter + 1) % self.window == 0:
            runner.message_hub.update_scalar(
                'train/qat_oscillation', self._tracker.pop_fraction())

    def after_train(self, runner) -> None:
        if self._tracker is not None and self._tracker.steps:
            runner.message_hub.update_scalar(
                'train/qat_oscillation', self._tracker.pop_fraction())


def _refuse_moved(hook: str, settings: Dict) -> None:
    moved = sorted(set(settings) & set(MODEL_SETTINGS))
    if moved:
        raise ValueError(
            f'{hook}: {", ".join(moved)} belong to the model now: model = '
            "dict(_delete_=True, type='QATDetector', detector="
            f'{{{{_base_.model}}}}, qat=dict({moved[0]}=...)) '
            '(mmcd.models.qat_detector)')
    for name, hook_type in (('cga', 'ConfidenceGuidedAnnealingHook'),
                            ('oscillation_window', 'QuantOscillationHook')):
        if name in settings:
            raise ValueError(f'{hook}: {name} is a hook of its own now: '
                             f"custom_hooks += [dict(type='{hook_type}', "
                             '...)]')
    if settings:
        raise ValueError(f'{hook}: unknown option(s) {sorted(settings)}')


def _qat_model(runner, hook: str):
    model = bare_model(runner.model)
    if getattr(model, 'qat_config', None) is None or \
            not trainable_weight_layers(model):
        raise ValueError(
            f'{hook} needs a model converted for QAT: model = dict('
            "_delete_=True, type='QATDetector', detector={{_base_.model}}, "
            "qat=dict(w_bits=4, a_bits=4, method='ofq'))")
    return model


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
