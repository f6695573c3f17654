"""mmcd's PTQ side by side with the tools a user would pick instead:
onnxruntime's ``quantize_static`` and NVIDIA ModelOpt's ONNX PTQ, on the
same exported float model and the same calibration images.

    python tools/benchmarks/compare_ptq_tools.py CONFIG CKPT
        [--scope features|detector]
        [--bits 8] [--mmcd repq-vit minmax repq-vit@tensorrt]
        [--profile onnxruntime]
        [--ort MinMax Percentile Entropy] [--modelopt max entropy]
        [--calib-images 32] [--pad-to 256] [--runs 10] [--threads 0]
        [--out-dir work_dirs/compare_ptq_tools] [--cfg-options K=V ...]

``--scope features`` (the default): every row quantizes the detector's
backbone + neck only and keeps the heads in float PyTorch (mmcd's export
of the features is the file all the tools share; ``QuantConfig(skip=...)``
leaves every module outside ``backbone.`` / ``neck.`` in float for mmcd).
``--scope detector``: every row is the whole detector, image in,
detections out (mmcd's end-to-end export through mmdeploy, two-stage
detectors), heads quantized too, run by onnxruntime. mmcd calibrates with
each ``--mmcd`` method, under ``--profile`` or the profile named after
``@``, and exports QDQ (:func:`mmcd.core.quant.qdq.to_qdq`);
onnxruntime's ``quantize_static`` runs once per ``--ort`` calibration
method and ModelOpt once per ``--modelopt`` method on the float export,
with the settings of :mod:`mmcd.deploy.other_tools` (8 bits only: it says
why). Each is fed the same calibration images (mmcd's calibration set:
``--calib-images`` train images through the test pipeline).

A tool that fails on the model ends its own row with its error (at the
detector scope onnxruntime's Percentile and Entropy calibrators do: they
stack every image's intermediate tensors, and the detector's RoI tensors
differ in size from image to image). For each row it prints the box / mask
mAP on the test set (onnxruntime
running the exported model, feeding the float PyTorch heads at the
features scope), the median latency of the exported model (interleaved
runs, batch 1), its ratio to float, and the integer kernels onnxruntime
fused. Every session
is :func:`mmcd.deploy.ort_session` (all graph optimizations; the
quantized ones without ``MatMulAddFusion``), so latencies differ by the
quantized graph only. ``--pad-to N`` pads every image to a multiple of N
(the data preprocessor's ``pad_size_divisor``; 256 makes every toy image
256x256): one static-shape file per tool serves the whole test set.
Writes ``compare_ptq_tools.json`` to ``--out-dir``.

ModelOpt is optional (docs/en/deployment.md: how to install it beside
mmcd's onnx and onnxruntime); ``--modelopt`` without it fails in one line.
"""
import argparse
import json
import os
import os.path as osp
import sys
from functools import partial

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import _bootstrap  # noqa: E402,F401  (before torch: tools/_bootstrap.py)
from mmengine.config import DictAction  # noqa: E402

import mmcd  # noqa: E402,F401
from mmcd.core.quant import DEFAULT_PROFILE, QuantConfig  # noqa: E402
from mmcd.core.quant.qdq import to_qdq  # noqa: E402
from mmcd.deploy import (INTEGER_KERNELS, FeatureExtractor,  # noqa: E402
                         OnnxFeatures, export_onnx, integer_kernel_counts,
                         interleaved_latency, ort_session)
from mmcd.deploy.end2end import end2end_detector  # noqa: E402
from mmcd.deploy.other_tools import (MODELOPT_METHODS,  # noqa: E402
                                     ORT_METHODS, modelopt_quantized,
                                     ort_quantized)
from mmcd.engine.calibration import (calibration_images,  # noqa: E402
                                     evaluate, evaluate_with_features,
                                     quantize_copy)
from mmcd.utils.runner_setup import (UserError,  # noqa: E402
                                      add_profile_argument,
                                      add_scope_argument, error_line,
                                      calibrated_from_checkpoint, run_main)

#: what every row quantizes: the modules of the exported backbone + neck
FEATURE_MODULES = r'^(?!backbone\.|neck\.)'


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    add_scope_argument(parser, 'what every row quantizes and runs in '
                       'onnxruntime')
    parser.add_argument('--bits', type=int, default=8,
                        help='weight and activation bits of every tool '
                        '(onnxruntime and ModelOpt rows: 8 only)')
    parser.add_argument('--mmcd', nargs='*', default=[
        'repq-vit', 'minmax', 'repq-vit@tensorrt'], metavar='METHOD[@PROFILE]',
                        help='mmcd PTQ methods, each under --profile or the '
                        'deployment profile after @')
    add_profile_argument(parser, '--profile')
    parser.add_argument('--ort', nargs='*', default=list(ORT_METHODS),
                        choices=ORT_METHODS, metavar='CALIBRATION',
                        help="onnxruntime quantize_static's calibration "
                        f'methods ({", ".join(ORT_METHODS)})')
    parser.add_argument('--modelopt', nargs='*', default=[],
                        choices=MODELOPT_METHODS, metavar='CALIBRATION',
                        help="ModelOpt's calibration methods "
                        f'({", ".join(MODELOPT_METHODS)}; needs '
                        'nvidia-modelopt)')
    parser.add_argument('--calib-images', type=int, default=32)
    parser.add_argument('--pad-to', type=int, default=256,
                        help='pad every image to a multiple of this')
    parser.add_argument('--runs', type=int, default=10)
    parser.add_argument('--threads', type=int, default=0,
                        help='onnxruntime intra-op threads (0: all cores)')
    parser.add_argument('--out-dir', default='work_dirs/compare_ptq_tools')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        default={}, help='override config settings, '
                        'key=value')
    args = parser.parse_args()
    if (args.ort or args.modelopt) and args.bits != 8:
        raise UserError(f'--bits {args.bits}: onnxruntime\'s and ModelOpt\'s '
                        'rows are 8-bit; give --ort --modelopt (none) to '
                        'compare mmcd methods alone at other widths')
    if args.modelopt:
        try:
            import modelopt.onnx.quantization  # noqa: F401
        except ImportError as err:
            raise UserError(f'--modelopt needs nvidia-modelopt ({err}); '
                            'docs/en/deployment.md says how to install it '
                            'beside onnxruntime') from None
    if args.runs < 1:
        raise UserError(f'--runs must be >= 1, got {args.runs}')
    return args


class FeatureScope:
    """Rows of the backbone + neck: exported by mmcd, evaluated with the
    float PyTorch heads."""
    what = 'backbone + neck, heads in float PyTorch'
    #: whether onnxruntime's quant_pre_process can infer the graph's shapes
    symbolic_shapes = True

    def __init__(self, args, runner, batch, images):
        self.args, self.runner, self.images = args, runner, images

    def exported(self, module, key: str) -> str:
        return export_onnx(FeatureExtractor(module), self.images[:1],
                           osp.join(self.args.out_dir, f'{key}.onnx'))

    def evaluated(self, path: str) -> dict:
        return evaluate_with_features(
            self.runner.model, OnnxFeatures(path, self.args.threads),
            self.runner.test_loop)


class DetectorScope(FeatureScope):
    """Rows of the whole detector: exported end to end through mmdeploy
    (:func:`mmcd.deploy.end2end.end2end_detector`) at the first calibration
    image's padded shape, evaluated in onnxruntime (every test image must
    be padded to that shape: ``--pad-to``)."""
    what = 'whole detector in onnxruntime'
    symbolic_shapes = False  # incomplete on mmdeploy's graph

    def __init__(self, args, runner, batch, images):
        super().__init__(args, runner, batch, images)
        first = runner.model.data_preprocessor(batch, False)
        self.sample = first['data_samples'][0]

    def exported(self, module, key: str) -> str:
        detector = end2end_detector(module, self.runner.cfg,
                                    out_dir=self.args.out_dir, prefix=key)
        detector.outputs(self.images[:1], self.sample)  # exports
        return detector.path_for(self.images[:1])

    def evaluated(self, path: str) -> dict:
        detector = end2end_detector(
            self.runner.model, self.runner.cfg, out_dir=self.args.out_dir,
            prefix=osp.splitext(osp.basename(path))[0])
        detector.use_file(path)
        return evaluate(detector, self.runner.test_loop)


def main():
    args = parse_args()
    args.cfg_options['model.data_preprocessor.pad_size_divisor'] = \
        args.pad_to
    args.quant_checkpoint = None
    os.makedirs(args.out_dir, exist_ok=True)
    skip = (FEATURE_MODULES, ) if args.scope == 'features' else ()
    configs = {}
    for spec in args.mmcd:
        method, _, profile = spec.partition('@')
        try:
            configs[f'mmcd {spec}'] = QuantConfig(
                args.bits, args.bits, method, skip=skip,
                profile=profile or args.profile or DEFAULT_PROFILE)
        except ValueError as err:
            raise UserError(f'--mmcd {spec}: {err}') from None
    runner, quant_model, batch = calibrated_from_checkpoint(
        args, next(iter(configs.values()), None), ['test_dataloader'])
    model = runner.model
    images = calibration_images(model, batch)
    shapes = {tuple(image.shape) for image in images}
    print(f'{len(images)} calibration images, padded to {shapes}')
    scope = (DetectorScope if args.scope == 'detector' else
             FeatureScope)(args, runner, batch, images)

    paths = {'float': scope.exported(model, 'float')}
    for i, (key, cfg) in enumerate(configs.items()):
        calibrated = quant_model if i == 0 else quantize_copy(model, cfg,
                                                              batch)
        to_qdq(calibrated, cfg.profile)
        paths[key] = scope.exported(calibrated, key.replace(' ', '_'))
    failed = {}  # another tool's error ends its row, not the run
    for key, quantize in [
            (f'onnxruntime {calibration}', partial(
                ort_quantized, calibration=calibration,
                symbolic_shapes=scope.symbolic_shapes))
            for calibration in args.ort] + [
            (f'ModelOpt {calibration}', partial(
                modelopt_quantized, calibration=calibration))
            for calibration in args.modelopt]:
        try:
            paths[key] = quantize(paths['float'], images)
        except Exception as err:  # noqa: B902 (a third-party tool's)
            failed[key] = error_line(err)
            print(f'{key}: failed, {failed[key]}')

    rows = {}
    for key, path in paths.items():
        print(f'{key}: evaluating {path}')
        scores = scope.evaluated(path)
        rows[key] = dict(path=path, box_map=scores.get('coco/bbox_mAP'),
                         mask_map=scores.get('coco/segm_mAP'))

    sessions = {}
    for key, row in rows.items():
        row['optimized_path'] = osp.join(args.out_dir,
                                         f'{osp.basename(row["path"])}.opt')
        sessions[key] = ort_session(row['path'], args.threads,
                                    row['optimized_path'])
    feed = {sessions['float'].get_inputs()[0].name: images[:1].numpy()}
    latency = interleaved_latency(sessions, feed, args.runs)
    print(f'\nW{args.bits}A{args.bits} {scope.what} at '
          f'{list(images.shape[1:])}; '
          f'{len(images)} calibration images; latency: median of '
          f'{args.runs} interleaved runs, batch 1, onnxruntime CPU\n')
    print('| tool | box mAP | mask mAP | latency (ms) | vs float | integer '
          'kernels |\n|---|---|---|---|---|---|')
    for key, row in rows.items():
        counts = integer_kernel_counts(row['optimized_path'])
        row.update(latency_ms=latency[key] * 1e3,
                   latency_ratio=latency[key] / latency['float'],
                   kernels=counts)
        fused = ', '.join(f'{op} {n}' for op, n in counts.items()
                          if op in INTEGER_KERNELS) or 'none'
        print(f'| {key} | {row["box_map"]:.3f} | {row["mask_map"]:.3f} | '
              f'{row["latency_ms"]:.1f} | {row["latency_ratio"]:.2f} | '
              f'{fused} |')
    for key, error in failed.items():
        rows[key] = dict(error=error)
        print(f'| {key} | failed: {error} | | | | |')
    path = osp.join(args.out_dir, 'compare_ptq_tools.json')
    with open(path, 'w') as f:
        json.dump(dict(config=args.config, checkpoint=args.checkpoint,
                       scope=args.scope, bits=args.bits,
                       calib_images=len(images),
                       input_shape=list(images.shape[1:]), runs=args.runs,
                       threads=args.threads, rows=rows), f, indent=2)
    print(f'wrote {path}')


if __name__ == '__main__':
    run_main(main)
