"""Export a detector's backbone + neck (or the whole detector) to ONNX,
float and calibrated QDQ, and check the quantized one in onnxruntime
against PyTorch.

    python tools/deploy/export_onnx.py CONFIG CKPT --quant w8a8|w4a4
        [--method repq-vit] [--calib-images 32] [--layer-bits REGEX=wNaM ...]
        [--scope features|detector] [--opset N] [--out-dir work_dirs/onnx]
        [--eval] [--draws 3] [--yardstick runtime]
    python tools/deploy/export_onnx.py CONFIG CKPT --quant-checkpoint FILE

``--scope detector`` exports the whole two-stage detector (image in,
boxes, labels, masks out) through mmdeploy (:mod:`mmcd.deploy.end2end`)
as ``e2e_float_{H}x{W}.onnx`` and ``e2e_w{N}a{M}_{method}_{H}x{W}.onnx``
and, with ``--eval``, evaluates float and quantized as mmdet computes
them, as exported (PyTorch under mmdeploy's rewriters), the draws of the
latter and onnxruntime (:func:`evaluate_detector`). The rest of this text
is the default scope, ``features``:

Calibrates as ``tools/test.py --quant`` does (PostTrainingQuantHook's
calibration images), or loads a model quantized (and reconstructed: the
rounded weights are integers, carried bit for bit) by
``tools/quantize.py``, rewrites the calibrated model in QDQ form
(:func:`mmcd.core.quant.qdq.to_qdq`: integer weights, QuantizeLinear/
DequantizeLinear activations; log-sqrt2, TanQ and uniform quantizers with
a fractional zero point, RepQ-ViT's reparameterized inputs, stay float
formulas) and
writes ``float_{H}x{W}.onnx`` and ``w{N}a{M}_{method}_{H}x{W}.onnx`` (static
shapes: one image of the calibration loader's padded shape; ``--eval``
exports one more pair per further shape the test set has) plus
``export.json``. Then it runs both in
onnxruntime on the first calibration image and prints, per feature level,
the deviation from PyTorch: float (should be ~1e-5), and quantized, in steps
of the quantizer that consumes the features (the RPN's input) and as a
fraction of the quantization noise itself. ``--eval`` also evaluates the
test set twice, with PyTorch fake quantization and with the onnxruntime
backbone + neck feeding the PyTorch heads, prints both mAPs and the
largest feature deviation over all test images.

onnxruntime sums in another order than PyTorch, so values on a rounding
boundary of a quantizer flip by one step and the flips spread: the exported
model is another *draw* of the same model's rounding noise. As the yardstick
of "close enough", ``--draws K`` (default 3) measures the simulation against
itself, K draws of the same fake-quantized model seeded 1..K whose float
arithmetic differs as another runtime's does: ``--yardstick runtime``
(default, :class:`mmcd.deploy.RuntimeDraw`) both sums every quantized
Linear, Conv2d and MatMul contraction in another order and moves the input
of every activation quantizer by at most one float32 rounding;
``summation`` (:class:`mmcd.deploy.SummationDraw`) and ``rounding``
(:class:`mmcd.deploy.RoundingDraw`) do one of the two. Each flips values on
rounding boundaries without changing the model. It prints one draw's feature
deviation beside onnxruntime's and, with ``--eval``, the mAP of K draws
(mean, std, range) beside the onnxruntime mAP (COCO's summary rounds mAP to
three decimals), and for each draw and onnxruntime how many detections
differ from the simulation's (no same-label IoU >= 0.9 counterpart,
:func:`mmcd.deploy.changed_detections`) and on how many images: a flip
spreads through the whole image, so the score moves with the number of
images that change.
"""
import argparse
import copy
import json
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import _bootstrap  # noqa: E402,F401  (must precede OpenMMLab imports)
import torch  # noqa: E402

import mmcd  # noqa: E402,F401
from mmcd.core.quant import DEFAULT_PROFILE  # noqa: E402
from mmcd.core.quant.qdq import to_qdq  # noqa: E402
from mmcd.deploy import (DRAWS, MIN_QDQ_OPSET,  # noqa: E402
                         ComparedFeatures, FeatureExtractor, OnnxPerShape,
                         changed_detections, feature_consumer,
                         profile_problems)
from mmcd.deploy.end2end import (END2END_MAX_OPSET,  # noqa: E402
                                 END2END_MIN_OPSET, END2END_OPSET,
                                 deploy_config, end2end_detector)
from mmcd.engine.calibration import (calibration_images,  # noqa: E402
                                     evaluate, evaluate_with_features)
from mmcd.utils.runner_setup import (UserError,  # noqa: E402
                                      add_ptq_arguments,
                                      add_scope_argument,
                                      calibrated_from_checkpoint, load_config,
                                      parse_layer_bits, ptq_config,
                                      run_main)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_ptq_arguments(parser, calib_images=32, out_dir='work_dirs/onnx')
    parser.add_argument('--layer-bits', nargs='+', default=(),
                        metavar='REGEX=wNaM')
    add_scope_argument(parser, 'what is exported')
    parser.add_argument('--opset', type=int,
                        help=f'ONNX opset (default {MIN_QDQ_OPSET} for '
                        f'features, {END2END_OPSET} for the detector)')
    parser.add_argument('--eval', action='store_true',
                        help='COCO mAP: PyTorch fake quantization vs the '
                        'onnxruntime backbone + neck')
    parser.add_argument('--draws', type=int, default=3,
                        help='draws of the simulation measured as the '
                        'yardstick of the onnxruntime deviation')
    parser.add_argument('--yardstick', choices=sorted(DRAWS),
                        default='runtime',
                        help='the draws: every quantized Linear/Conv2d/'
                        'MatMul summed in another order (summation), '
                        'quantizer inputs moved by one float32 rounding '
                        '(rounding), or both (runtime, the default)')
    return parser.parse_args()


def feature_deviation(ort_feats, torch_feats, float_feats, step):
    """Per level: max and mean |ORT - PyTorch| in quantization steps, and
    ||ORT - PyTorch|| / ||PyTorch quantized - float||."""
    rows = []
    for a, b, f in zip(ort_feats, torch_feats, float_feats):
        diff = (a - b).abs()
        rows.append(dict(shape=list(a.shape),
                         max_steps=float(diff.max() / step),
                         mean_steps=float(diff.mean() / step),
                         vs_quant_noise=float((a - b).norm() /
                                              (b - f).norm().clamp_min(1e-12))))
    return rows


def map_summary(fake: dict, drawn: list, ort: dict, kind: str,
                what: str) -> dict:
    """Print, per mAP, the simulation's, the draws' (mean, std, range) and
    onnxruntime's; returns how many of the draws' standard deviations
    onnxruntime is from their mean (nan with one draw, or when all draws
    agree)."""
    standard_scores = {}
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        if key not in fake:  # a box-only detector (DINO)
            continue
        values = torch.tensor([d[key] for d in drawn], dtype=torch.float64)
        mean = float(values.mean())
        spread = float(values.std()) if len(drawn) > 1 else float('nan')
        standard_scores[key] = (ort[key] - mean) / spread if spread > 0 \
            else float('nan')
        print(f'{key}: PyTorch fake quantization {fake[key]:.4f}; '
              f'{len(drawn)} {kind} draws {mean:.4f} +- {spread:.4f} '
              f'({float(values.min()):.4f}..{float(values.max()):.4f}); '
              f'{what} {ort[key]:.4f} (gap {ort[key] - fake[key]:+.4f}; '
              f'{standard_scores[key]:+.1f} std from the draws\' mean)')
    return standard_scores


def print_changed(key: str, changed: dict, reference: str) -> None:
    print(f'{key} vs {reference}: detections without a same-label IoU >= '
          f'0.9 counterpart: {changed["changed"]} of {changed["total"]}, on '
          f'{len(changed["images"])} images')


def evaluate_detector(model, quant_model, exported: dict, loop, draws: int,
                      kind: str, model_cfg) -> dict:
    """``--scope detector --eval``: mAPs of the float and fake-quantized
    detector as mmdet computes them (PyTorch post-processing), as the
    export computes them (``runtime='pytorch'``: the same model under
    mmdeploy's rewriters), of ``draws`` draws of the latter (the
    yardstick), and of the onnxruntime exports ``exported`` (float, then
    quantized); detections changed against the PyTorch run of the same
    function."""
    float_name, quant_name = list(exported)
    predictions, maps = {}, {}

    def run(key, detector):
        maps[key] = evaluate(detector, loop, predictions.setdefault(key, []))
        return maps[key]

    run('float mmdet', model)
    run('float rewritten', end2end_detector(model, model_cfg,
                                            runtime='pytorch'))
    run('float onnxruntime', exported[float_name])
    run('sim mmdet', quant_model)
    rewritten = end2end_detector(quant_model, model_cfg, runtime='pytorch')
    run('sim rewritten', rewritten)
    drawn = []
    for seed in range(1, draws + 1):
        with DRAWS[kind](quant_model, seed).applied():
            drawn.append(run(f'{kind} draw {seed}', rewritten))
    ort = run('onnxruntime', exported[quant_name])
    changed = {}
    for key, reference in [('float rewritten', 'float mmdet'),
                           ('float onnxruntime', 'float rewritten'),
                           ('sim rewritten', 'sim mmdet')] + [
                               (f'{kind} draw {seed}', 'sim rewritten')
                               for seed in range(1, draws + 1)] + [
                                   ('onnxruntime', 'sim rewritten')]:
        changed[key] = changed_detections(predictions[reference],
                                          predictions[key])
        changed[key]['reference'] = reference
        print_changed(key, changed[key], reference)
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        if key in maps['float mmdet']:
            print(f'{key}: float mmdet {maps["float mmdet"][key]:.4f}, '
                  f'as exported (PyTorch) {maps["float rewritten"][key]:.4f}'
                  f', onnxruntime {maps["float onnxruntime"][key]:.4f}; '
                  f'quantized mmdet {maps["sim mmdet"][key]:.4f}')
    standard_scores = map_summary(maps['sim rewritten'], drawn, ort, kind,
                                  'onnxruntime end to end')
    return dict(maps=maps, draw_kind=kind, draws=drawn,
                standard_scores=standard_scores, detections=changed)


def evaluate_draws(quant_model, ort_features, loop, draws: int,
                   step: float, kind: str) -> dict:
    """mAPs of the fake-quantized model, of ``draws`` draws of it of
    ``kind`` (``DRAWS``), and of the onnxruntime backbone + neck
    ``ort_features`` feeding its PyTorch heads; the features of the draws
    and of onnxruntime are compared with the simulation's on every test
    image (:class:`ComparedFeatures`, in units of ``step``); prints the
    comparison."""
    predictions = {}

    def with_features(key, extract_feat):  # heads stay in PyTorch
        return evaluate_with_features(quant_model, extract_feat, loop,
                                      predictions.setdefault(key, []))

    simulation = FeatureExtractor(quant_model)
    fake = evaluate(quant_model, loop, predictions.setdefault('sim', []))
    # features compared with the simulation's on every test image
    checked = {f'{kind} draw {seed}': ComparedFeatures(
        DRAWS[kind](quant_model, seed), simulation, step)
               for seed in range(1, draws + 1)}
    drawn = [with_features(key, value) for key, value in checked.items()]
    checked['onnxruntime'] = ComparedFeatures(ort_features, simulation, step)
    ort = with_features('onnxruntime', checked['onnxruntime'])
    checked = {key: value.summary() for key, value in checked.items()}
    for key, found in checked.items():
        # what decides the score: the detections the features change
        found['detections'] = changed_detections(predictions['sim'],
                                                 predictions[key])
        print(f'all {found["calls"]} test images, {key} vs PyTorch: '
              'features: max |d| per level '
              f'{", ".join(f"{m:.2f}" for m in found["max_steps"])} steps, '
              f'{found["beyond_one_step"]} of {found["values"]} values more '
              'than one step apart; detections without a same-label '
              'IoU >= 0.9 counterpart: '
              f'{found["detections"]["changed"]} of '
              f'{found["detections"]["total"]}, on '
              f'{len(found["detections"]["images"])} images')
    standard_scores = map_summary(fake, drawn, ort, kind,
                                  'onnxruntime backbone + neck')
    return dict(fake_quant=fake, draw_kind=kind, draws=drawn,
                onnxruntime=ort, standard_scores=standard_scores,
                all_images_feature_deviation=checked)


def export_record(args, report: dict, input_shape, times: dict,
                  paths: dict, **fields) -> dict:
    """What ``export.json`` holds for either scope, plus ``fields``."""
    return dict(config=args.config, checkpoint=args.checkpoint,
                scope=args.scope, quant=args.quant, method=args.method,
                profile=args.profile, input_shape=list(input_shape),
                opset=args.opset,
                export_seconds=times, files=paths,
                forms={k: len(v) for k, v in report.items()},
                float_formula_layers=report['float_formula'],
                fractional_zero_layers=report['fractional_zero'], **fields)


def check_profile(path: str, profile: str) -> None:
    """Refuse an exported file that breaks its profile's runtime rules
    (:func:`mmcd.deploy.profile_problems`), naming the first problems."""
    problems = profile_problems(path, profile)
    if problems:
        raise UserError(f'{path} breaks the {profile} profile\'s rules in '
                        f'{len(problems)} place(s): {"; ".join(problems[:3])}')


def write_record(args, results: dict) -> None:
    path = osp.join(args.out_dir, 'export.json')
    with open(path, 'w') as f:
        json.dump(results, f, indent=2, default=float)
    print(f'wrote {path}')


def export_whole_detector(args, runner, quant_model, qdq_model, report,
                          first_batch, name) -> None:
    """``--scope detector``: float and QDQ (``name``) end-to-end exports at
    the shape of ``first_batch`` (one calibration image), checked there
    against the same function in PyTorch; with ``--eval``,
    :func:`evaluate_detector`."""
    model, model_cfg = runner.model, runner.cfg
    exported = {key: end2end_detector(
        module, model_cfg, out_dir=args.out_dir, prefix=f'e2e_{key}',
        opset=args.opset) for key, module in (('float', model),
                                              (name, qdq_model))}
    first = model.data_preprocessor(first_batch, False)
    image, sample = first['inputs'], first['data_samples'][0]
    paths, times, deviation = {}, {}, {}
    for key, module in (('float', model), (name, quant_model)):
        start = time.perf_counter()
        found = exported[key].outputs(image, sample)
        times[key] = time.perf_counter() - start
        paths[key] = exported[key].path_for(image)
        if key == name:
            check_profile(paths[key], args.profile)
        reference = end2end_detector(module, model_cfg, runtime='pytorch'
                                     ).outputs(image, sample)
        same = [a.shape == b.shape for a, b in zip(found, reference)]
        deviation[key] = dict(
            detections=[int(found[0].shape[1]), int(reference[0].shape[1])],
            max_abs=[float((a.float() - b.float()).abs().max())
                     if ok and a.numel() else None
                     for a, b, ok in zip(found, reference, same)])
        print(f'exported {paths[key]} ({times[key]:.1f} s); first image: '
              f'{deviation[key]["detections"][0]} detections in onnxruntime, '
              f'{deviation[key]["detections"][1]} in PyTorch; max |d| of '
              f'dets/labels/masks: {deviation[key]["max_abs"]}')
    results = export_record(args, report, image.shape, times, paths,
                            first_image=deviation)
    if args.eval:
        results['map'] = evaluate_detector(model, quant_model, exported,
                                           runner.test_loop, args.draws,
                                           args.yardstick, model_cfg)
    write_record(args, results)


def main():
    args = parse_args()
    quant_cfg = ptq_config(args,
                           layer_bits=parse_layer_bits(args.layer_bits))
    if args.draws < 1:
        raise UserError(f'--draws must be >= 1, got {args.draws}')
    if args.scope == 'features':
        args.opset = args.opset or MIN_QDQ_OPSET
        if args.opset < MIN_QDQ_OPSET:
            raise UserError(f'--opset {args.opset}: the QDQ export of the '
                            f'features needs opset >= {MIN_QDQ_OPSET} (4-bit '
                            'integer types)')
    else:
        args.opset = args.opset or END2END_OPSET
        if not END2END_MIN_OPSET <= args.opset <= END2END_MAX_OPSET:
            raise UserError(f'--opset {args.opset}: the end-to-end export '
                            f'takes opsets {END2END_MIN_OPSET}..'
                            f'{END2END_MAX_OPSET} (per-axis DequantizeLinear; '
                            'the TorchScript exporter mmdeploy uses)')
        try:  # a detector the export does not cover, before calibrating
            deploy_config(load_config(args.config, args.cfg_options))
        except ValueError as err:
            raise UserError(str(err)) from None
    runner, quant_model, calib_batch = calibrated_from_checkpoint(
        args, quant_cfg, ['test_dataloader'])
    model = runner.model
    qdq_model = copy.deepcopy(quant_model)
    report = to_qdq(qdq_model, quant_cfg.profile)
    name = f'w{quant_cfg.w_bits}a{quant_cfg.a_bits}_{quant_cfg.method}'
    if quant_cfg.profile != DEFAULT_PROFILE:
        name += f'_{quant_cfg.profile}'
    first_batch = dict(inputs=calib_batch['inputs'][:1],
                       data_samples=calib_batch['data_samples'][:1])
    if args.scope == 'detector':
        return export_whole_detector(args, runner, quant_model, qdq_model,
                                     report, first_batch, name)
    images = calibration_images(model, calib_batch)[:1]
    exported = {key: OnnxPerShape(FeatureExtractor(module), args.out_dir,
                                  key, args.opset)
                for key, module in (('float', model), (name, qdq_model))}
    paths, times, outputs = {}, {}, {}
    for key, onnx_model in exported.items():
        start = time.perf_counter()
        outputs[key] = onnx_model(images)  # exports at this shape
        times[key] = time.perf_counter() - start
        paths[key] = onnx_model.path_for(images)
    check_profile(paths[name], args.profile)
    with torch.no_grad():
        float_feats = FeatureExtractor(model)(images)
        quant_feats = FeatureExtractor(quant_model)(images)
        draw_feats = DRAWS[args.yardstick](quant_model, seed=1)(images)
    consumer = feature_consumer(quant_model, first_batch)
    step = float(consumer.scale.max()) if consumer is not None and \
        consumer.calibrated else 1.0
    float_dev = max(float((a - b).abs().max()) for a, b in zip(
        outputs['float'], float_feats))
    quant_dev = feature_deviation(outputs[name], quant_feats, float_feats,
                                  step)
    draw_dev = feature_deviation(draw_feats, quant_feats, float_feats, step)
    results = export_record(
        args, report, images.shape, times, paths,
        float_max_abs_deviation=float_dev, quant_deviation=quant_dev,
        draw_kind=args.yardstick, draw_deviation=draw_dev, feature_step=step,
        feature_consumer=getattr(consumer, 'layer_name', None))
    print(f'exported {paths["float"]} ({times["float"]:.1f} s) and '
          f'{paths[name]} ({times[name]:.1f} s); QDQ forms: '
          f'{results["forms"]}')
    print(f'float: onnxruntime vs PyTorch max |d| {float_dev:.2e}')
    for level, (row, draw) in enumerate(zip(quant_dev, draw_dev)):
        print(f'{name} level {level} {row["shape"]}: onnxruntime vs PyTorch '
              f'max |d| {row["max_steps"]:.2f} steps, mean '
              f'{row["mean_steps"]:.3f} steps, {row["vs_quant_noise"]:.2f} x '
              f'the quantization noise; a {args.yardstick} draw of the '
              'simulation: '
              f'{draw["max_steps"]:.2f}, {draw["mean_steps"]:.3f}, '
              f'{draw["vs_quant_noise"]:.2f}')
    if args.eval:
        results['map'] = evaluate_draws(quant_model, exported[name],
                                        runner.test_loop, args.draws, step,
                                        args.yardstick)
    write_record(args, results)


if __name__ == '__main__':
    run_main(main)
