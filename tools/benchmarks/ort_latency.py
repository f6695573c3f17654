"""onnxruntime latency of the QDQ (integer) backbone + neck, or of the whole
detector, against float.

For the toy Swin Mask R-CNN (256 px) and Mask R-CNN Swin-T (512x768), built
from the configs (random weights, random images: no data needed), exports
backbone + neck in float and as W{bits}A{bits} QDQ (``mmcd.deploy``,
calibrated on the timing image), runs both in onnxruntime on the CPU with
all graph optimizations, interleaved, and prints the median latencies, their
ratio, and what onnxruntime made of the QDQ pattern: the quantized-kernel
nodes it fused (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, ...) and
the DequantizeLinear nodes left in front of float kernels. The float model
runs with every optimization, the QDQ model without ``MatMulAddFusion``
(:data:`mmcd.deploy.QDQ_DISABLED_OPTIMIZERS`: it would turn the Linear
layers into float Gemms before the integer fusion sees them). Under the
``onnxruntime`` profile the convolutions are exported as integer matmuls
(``DeployProfile.conv_as_integer_matmul``), which it fuses too.

``--scope detector`` times the whole detector exported end to end
(``mmcd.deploy.end2end``: image in, boxes, labels, masks out; calibrated
on a full forward of the timing image, heads included).

``--kernel-times`` then runs both models ``--runs`` more times under
onnxruntime's profiler and prints the kernel time per operator type (ms
per run, largest first): what is left in float, what runs in integers.

``--ort-static CALIBRATION`` also times onnxruntime's own
``quantize_static`` of the float export, calibrated on the timing image
(:mod:`mmcd.deploy.other_tools`), in the same interleaved runs.

``--profile tensorrt`` quantizes for TensorRT's INT8 (symmetric grids,
int8 zero point 0: :mod:`mmcd.core.quant.profiles`), which onnxruntime runs
with its signed integer kernels.

    python tools/benchmarks/ort_latency.py [--models toy swin-t]
        [--bits 8] [--method minmax] [--profile onnxruntime|tensorrt]
        [--runs 10] [--scope features|detector] [--threads 0]
        [--kernel-times] [--ort-static MinMax]
"""
import argparse
import copy
import os.path as osp
import sys
import tempfile
import warnings

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import _bootstrap  # noqa: E402,F401  (before torch: tools/_bootstrap.py)
warnings.filterwarnings('ignore')
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import mmcd  # noqa: E402,F401
from mmcd.core.quant import (DEFAULT_PROFILE, DEPLOY_PROFILES,  # noqa
                             QuantConfig, calibrate, quantize_model)
from mmcd.core.quant.methods import QUANT_METHODS  # noqa: E402
from mmcd.core.quant.qdq import to_qdq  # noqa: E402
from mmcd.deploy import (INTEGER_KERNELS, FeatureExtractor,  # noqa: E402
                         export_onnx, integer_kernel_counts,
                         interleaved_latency, kernel_times, ort_session)
from mmcd.deploy.end2end import end2end_detector  # noqa: E402
from mmcd.deploy.other_tools import ORT_METHODS, ort_quantized  # noqa
from mmcd.utils.benchmark_models import (  # noqa: E402
    BENCHMARK_DETECTORS, REPO, build_detector)

SCOPES = dict(features='backbone + neck', detector='whole detector')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=list(
        BENCHMARK_DETECTORS), choices=list(BENCHMARK_DETECTORS))
    parser.add_argument('--bits', type=int, default=8)
    parser.add_argument('--method', default='minmax',
                        choices=list(QUANT_METHODS))
    parser.add_argument('--profile', default=DEFAULT_PROFILE,
                        choices=list(DEPLOY_PROFILES))
    parser.add_argument('--runs', type=int, default=10)
    parser.add_argument('--scope', choices=('features', 'detector'),
                        default='features')
    parser.add_argument('--threads', type=int, default=0,
                        help='onnxruntime intra-op threads (0: all cores)')
    parser.add_argument('--kernel-times', action='store_true',
                        help="kernel time per operator type (onnxruntime's "
                        'profiler), float and QDQ')
    parser.add_argument('--ort-static', choices=ORT_METHODS,
                        metavar='CALIBRATION',
                        help="also time onnxruntime's own quantize_static "
                        'of the float export (features scope, 8 bits; '
                        f'{", ".join(ORT_METHODS)})')
    args = parser.parse_args()
    if args.ort_static and (args.scope != 'features' or args.bits != 8):
        parser.error('--ort-static times the 8-bit backbone + neck: drop '
                     '--scope detector / --bits')
    init_default_scope('mmdet')
    torch.manual_seed(0)
    print(f'onnxruntime {ort.__version__}, CPU, W{args.bits}A{args.bits} '
          f'{args.method} (profile {args.profile}) vs float, '
          f'{SCOPES[args.scope]}, batch 1, median of '
          f'{args.runs} interleaved runs')
    folder = tempfile.mkdtemp(prefix='ort_latency_')
    for key in args.models:
        name, config, size = BENCHMARK_DETECTORS[key]
        model = build_detector(config)
        images = torch.rand(1, 3, *size) * 2 - 1
        cfg = QuantConfig(args.bits, args.bits, args.method,
                          first_layer_bits=max(8, args.bits),
                          profile=args.profile)
        sample = DetDataSample(metainfo=dict(
            img_shape=size, ori_shape=size, pad_shape=size,
            batch_input_shape=size, scale_factor=(1.0, 1.0)))
        quant = quantize_model(copy.deepcopy(model), cfg)
        calibrate(quant, cfg, lambda: quant.extract_feat(images)
                  if args.scope == 'features' else
                  quant.predict(images, [copy.deepcopy(sample)]))
        to_qdq(quant, args.profile)
        sessions, paths = {}, {}
        for label, module in (('float', model), ('qdq', quant)):
            if args.scope == 'features':
                path = export_onnx(FeatureExtractor(module), images,
                                   osp.join(folder, f'{key}_{label}.onnx'))
            else:
                exported = end2end_detector(
                    module, Config.fromfile(osp.join(REPO, config)),
                    out_dir=folder, prefix=f'{key}_{label}')
                exported.outputs(images, sample)  # exports
                path = exported.path_for(images)
            paths[label] = path
        if args.ort_static:
            paths['ort'] = ort_quantized(paths['float'], images,
                                         args.ort_static)
        for label, path in paths.items():
            sessions[label] = ort_session(path, args.threads, osp.join(
                folder, f'{key}_{label}_optimized.onnx'))
        feed = {sessions['float'].get_inputs()[0].name: images.numpy()}
        latency = interleaved_latency(sessions, feed, args.runs)
        t_float, t_qdq = latency['float'], latency['qdq']
        if args.ort_static:
            found = integer_kernel_counts(osp.join(
                folder, f'{key}_ort_optimized.onnx'))
            print(f"{name}: onnxruntime's quantize_static "
                  f'({args.ort_static}) {latency["ort"] * 1e3:.1f} ms, ratio '
                  f'{latency["ort"] / t_float:.2f}; its integer kernels '
                  f'{found}')
        found = integer_kernel_counts(osp.join(folder,
                                               f'{key}_qdq_optimized.onnx'))
        fused = {op: n for op, n in found.items() if op in INTEGER_KERNELS}
        print(f'{name}: float {t_float * 1e3:.1f} ms, QDQ '
              f'{t_qdq * 1e3:.1f} ms, ratio {t_qdq / t_float:.2f}; fused '
              f'integer kernels {fused or "none"}, DequantizeLinear left '
              f'{found.get("DequantizeLinear", 0)}, QuantizeLinear '
              f'{found.get("QuantizeLinear", 0)}')
        if args.kernel_times:
            print_kernel_times(paths, feed, args, osp.join(folder, key))


def print_kernel_times(paths, feed, args, prefix, top=8):
    """Kernel time per operator type of each model under onnxruntime's
    profiler, ms per run, largest first (the rest summed)."""
    for label, path in paths.items():
        session = ort_session(path, args.threads,
                              profile_prefix=f'{prefix}_{label}')
        for _ in range(args.runs):
            session.run(None, feed)
        times = kernel_times(session.end_profiling())
        total = sum(times.values())
        ranked = sorted(times.items(), key=lambda item: -item[1])
        shown = [f'{op} {t / args.runs * 1e3:.1f} ({t / total:.0%})'
                 for op, t in ranked[:top]]
        rest = sum(t for _, t in ranked[top:])
        if rest:
            shown.append(f'other {rest / args.runs * 1e3:.1f} '
                         f'({rest / total:.0%})')
        print(f'  {label} kernels, {total / args.runs * 1e3:.1f} ms per '
              f'run: ' + ', '.join(shown))


if __name__ == '__main__':
    main()
