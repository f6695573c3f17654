"""Post-training quantization of the evaluated model, as an MMEngine hook.

A config that inherits a detector config adds::

    custom_hooks = [dict(type='PostTrainingQuantHook', w_bits=4, a_bits=4,
                         method='repq-vit', calib=dict(num_images=32))]

and ``tools/test.py CONFIG CHECKPOINT`` reports the quantized COCO mAP
(``tools/test.py --quant w4a4`` is a shortcut). Before each test (and val)
epoch the hook copies the model (after EMAHook has swapped in the EMA
weights: lower priority), converts the copy with
:func:`mmcd.core.quant.quantize_model`, calibrates it on ``num_images``
images of a calibration dataloader (default: the train set with the test
pipeline, i.e. without augmentation) and evaluates the copy instead of the
model; after the epoch the float model is put back. The trained weights, and
so every checkpoint, are never touched, and each epoch starts from the float
model, so quantizers never stack.

With ``compare_fp=True`` the float model is evaluated first in the same run,
and a table of float vs quantized box/mask AP and the drop is logged.
With a reconstructing method (``qdrop``, ``aphq-vit``) or
``reconstruction=dict(...)`` the calibrated copy is then reconstructed
block by block (AdaRound, learned steps, QDrop, APHQ-ViT's loss and MLP
reconstruction: :mod:`mmcd.core.quant.reconstruction`), with each unit's
output error before and after in the log and in ``quant_results.json``.
The precision plan (each quantized layer's bits, the weighted layers left
in float, and why: :func:`mmcd.core.quant.precision_plan`) is logged as a
table at conversion. Results (bits, method, calibration size, metrics, the
plan per layer) are written as JSON to ``quant_results.json`` in the log
dir and the work dir.
"""
import json
import math
from dataclasses import asdict
import os.path as osp
from typing import Dict, Optional, Sequence

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from mmcd.core.quant import (DEFAULT_PROFILE, QuantConfig, format_precision_plan,
                             precision_plan)
from mmcd.core.quant.debug import quantization_report

from ..calibration import (CalibrationOptions, calibration_images,
                           dense_outputs, evaluate, quantize_copy)
from ..model_utils import bare_model
from ..quantized_checkpoint import load_quantized_model

#: metrics of the float-vs-quantized table, in this order, when the
#: evaluator reports them (an evaluator reporting none of them, e.g. VOC's,
#: gets every metric it reports)
REPORTED_METRICS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP',
                    'coco/segm_mAP_50', 'coco_panoptic/PQ',
                    'coco_panoptic/SQ', 'coco_panoptic/RQ')


@HOOKS.register_module()
class PostTrainingQuantHook(Hook):
    """Quantize the model for evaluation (see module docstring).

    Args:
        w_bits, a_bits: weight / activation bits, 2..8.
        method: a registered method (``'minmax'``, ``'repq-vit'``,
            ``'dopq-vit'``, ``'qdrop'``, ``'aphq-vit'``,
            :mod:`mmcd.core.quant.methods`).
        calib: ``num_images`` (32), ``dataloader`` (a dataloader config;
            default the train dataloader with the test pipeline; its batch
            size is set to num_images: the calibration set is one batch),
            ``seed`` (0: which images are drawn).
        scope, skip, first_layer_bits, weight_search, layer_bits,
            reconstruction: see :class:`mmcd.core.quant.QuantConfig`
            (``layer_bits``: mixed precision, ``[dict(pattern=REGEX,
            w_bits=8, a_bits=8)]``; ``reconstruction``: options of the
            reconstruction after calibration, ``dict(iters=20000, ...)``,
            overriding the method's).
        profile: the runtime the model is quantized for
            (``'onnxruntime'``; ``'tensorrt'``: symmetric INT8, zero point
            0, uniform post-softmax, residual additions' inputs quantized,
            8 bits only: :mod:`mmcd.core.quant.profiles`).
        compare_fp: evaluate the float model first and log both.
        stages: ``'test'`` and/or ``'val'``.
        quantized_checkpoint: a file written by ``tools/quantize.py``: the
            calibrated (and reconstructed) model is loaded from it instead
            of calibrated again; made for other settings or another
            detector config, it is refused naming what differs
            (:mod:`mmcd.engine.quantized_checkpoint`).
        debug: after calibration, compare float and quantized runs on the
            calibration images layer by layer
            (:func:`mmcd.core.quant.debug.quantization_report` on the
            backbone, neck and RPN): each layer's output, input and weight
            SQNR go to the visualizer (``ptq_sqnr/...`` scalars), the five
            worst layers to the log, all to ``quant_debug.json``.
    """
    priority = 'BELOW_NORMAL'  # after EMAHook (NORMAL) swaps in EMA weights

    def __init__(self, w_bits: int = 4, a_bits: int = 4,
                 method: str = 'repq-vit', calib: Optional[Dict] = None,
                 scope: str = 'all', skip: Sequence[str] = (),
                 first_layer_bits: int = 8, compare_fp: bool = False,
                 stages: Sequence[str] = ('test', 'val'),
                 weight_search: Optional[str] = None,
                 layer_bits: Sequence[Dict] = (), debug: bool = False,
                 reconstruction: Optional[Dict] = None,
                 quantized_checkpoint: Optional[str] = None,
                 profile: str = DEFAULT_PROFILE):
        self.quant_cfg = QuantConfig(w_bits, a_bits, method, scope,
                                     tuple(skip), first_layer_bits,
                                     weight_search=weight_search,
                                     layer_bits=layer_bits,
                                     reconstruction=reconstruction,
                                     profile=profile)
        self.calib = CalibrationOptions.from_dict(calib)
        unknown = set(stages) - {'test', 'val'}
        if unknown:
            raise ValueError(f"stages must be 'test' and/or 'val', got "
                             f'{sorted(unknown)}')
        self.stages, self.compare_fp = tuple(stages), compare_fp
        self.debug = debug
        self.quantized_checkpoint = quantized_checkpoint
        self._float_model = None
        self._fp_metrics = None
        self._plan = []  # precision_plan of the quantized model
        self._summary = {}  # reconstruction stats of the quantized model

    # ------------------------------------------------------------- stages --
    def before_test_epoch(self, runner) -> None:
        if 'test' in self.stages:
            self._quantize(runner, runner.test_loop)

    def after_test_epoch(self, runner, metrics=None) -> None:
        if 'test' in self.stages:
            self._restore(runner, metrics)

    def before_val_epoch(self, runner) -> None:
        if 'val' in self.stages:
            self._quantize(runner, runner.val_loop)

    def after_val_epoch(self, runner, metrics=None) -> None:
        if 'val' in self.stages:
            self._restore(runner, metrics)

    # ---------------------------------------------------------------- work --
    def _quantize(self, runner, loop) -> None:
        model = runner.model
        float_model = bare_model(model)
        self._fp_metrics = None
        if self.compare_fp:
            print_log('PostTrainingQuantHook: evaluating the float model',
                      logger='current')
            self._fp_metrics = evaluate(float_model, loop)
        self._summary = {}
        if self.quantized_checkpoint is not None:
            quant_model = self._load(runner, float_model)
            calib_batch = None
        else:
            calib_batch = self.calib.batch(runner.cfg)
            quant_model = quantize_copy(
                float_model, self.quant_cfg, calib_batch, self._summary,
                self.calib.reconstruction_batch(runner.cfg, self.quant_cfg))
        self._plan = precision_plan(quant_model, self.quant_cfg)
        print_log('PostTrainingQuantHook: precision plan\n' +
                  format_precision_plan(self._plan), logger='current')
        if self.debug:
            self._log_debug(runner, quant_model,
                            calib_batch or self.calib.batch(runner.cfg))
        self._float_model = model
        runner.model = quant_model

    def _load(self, runner, float_model):
        """The quantized model of ``self.quantized_checkpoint``."""
        quant_model = load_quantized_model(
            float_model, self.quant_cfg, runner.cfg.model,
            self.quantized_checkpoint, runner.cfg.get('load_from'))
        self._summary['quantized_checkpoint'] = self.quantized_checkpoint
        return quant_model

    def _log_debug(self, runner, quant_model, calib_batch) -> None:
        images = calibration_images(quant_model, calib_batch)
        report = quantization_report(
            quant_model, lambda: dense_outputs(quant_model, images))
        scalars = {}
        for name, entry in report.items():
            values = dict(output=entry['output_sqnr'],
                          weight=entry.get('weight_sqnr'),
                          **{f'input.{k}': v
                             for k, v in entry['input_sqnr'].items()})
            scalars.update({f'ptq_sqnr/{kind}/{name}': value
                            for kind, value in values.items()
                            if value is not None and math.isfinite(value)})
        runner.visualizer.add_scalars(scalars, step=runner.iter)
        ranked = sorted((e['output_sqnr'], n) for n, e in report.items()
                        if e['output_sqnr'] is not None)
        print_log('PostTrainingQuantHook debug: lowest output SQNR: ' +
                  ', '.join(f'{n} {db:.1f} dB' for db, n in ranked[:5]),
                  logger='current')
        if runner.rank == 0:
            with open(osp.join(runner.log_dir, 'quant_debug.json'), 'w') as f:
                json.dump(report, f, indent=2)

    def _restore(self, runner, metrics) -> None:
        if self._float_model is None:
            return
        runner.model, self._float_model = self._float_model, None
        cfg = self.quant_cfg
        results = dict(w_bits=cfg.w_bits, a_bits=cfg.a_bits,
                       method=cfg.method, scope=cfg.scope,
                       layer_bits=[vars(rule) for rule in cfg.layer_bits],
                       calib_images=self.calib.num_images,
                       reconstruction=_options(cfg.reconstruction_config()),
                       metrics=_floats(metrics or {}), plan=self._plan,
                       **self._summary)
        if self._fp_metrics is not None:
            results['fp_metrics'] = _floats(self._fp_metrics)
            print_log(comparison_table(results), logger='current')
        if runner.rank == 0:
            for folder in {runner.log_dir, runner.work_dir}:
                with open(osp.join(folder, 'quant_results.json'), 'w') as f:
                    json.dump(results, f, indent=2)


def _options(recon) -> Optional[Dict]:
    """The reconstruction's options, JSON-ready (None: calibration only)."""
    return None if recon is None else json.loads(json.dumps(asdict(recon)))


def _floats(metrics: Dict) -> Dict:
    return {k: float(v) for k, v in metrics.items()}


def comparison_table(results: Dict) -> str:
    """Float vs quantized AP, and the drop, as a text table."""
    name = f'W{results["w_bits"]}A{results["a_bits"]} {results["method"]}'
    if results.get('reconstruction') is not None:
        name += ' + recon'
    both = [key for key in results['fp_metrics'] if key in results['metrics']]
    keys = [key for key in REPORTED_METRICS if key in both] or both
    width = max([18] + [len(key) + 1 for key in keys])
    lines = [f'{"metric":<{width}}{"float":>8}{name:>28}{"drop":>8}']
    for key in keys:
        fp, q = results['fp_metrics'][key], results['metrics'][key]
        lines.append(f'{key:<{width}}{fp:>8.3f}{q:>28.3f}{fp - q:>8.3f}')
    return '\n'.join(['PostTrainingQuantHook results:'] + lines)
