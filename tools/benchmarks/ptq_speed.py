"""Calibration time and quantized-eval throughput of mmcd's PTQ.

For the toy Swin Mask R-CNN and for Mask R-CNN Swin-T at its real shapes,
built from the configs (random init, random images, no data needed), prints
in one run: the time to calibrate on 32 images (one batch, quantization on,
as :func:`mmcd.core.quant.calibrate` does) as a ratio of the float model's
inference on the same 32 images one by one, timed right after it (median of
``--repeat`` such pairs), and the inference time of the
quantized model as a ratio of the float model's (backbone + neck + RPN +
RoI heads through ``model.test_step``-equivalent ``predict``).

    python tools/benchmarks/ptq_speed.py [--images 32] [--method repq-vit]
        [--models toy swin-t]
"""
import argparse
import copy
import os.path as osp
import statistics
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import _bootstrap  # noqa: E402,F401  (before torch: tools/_bootstrap.py)
import torch  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import mmcd  # noqa: E402,F401
from mmcd.core.quant import QuantConfig, calibrate, quantize_model  # noqa
from mmcd.utils.benchmark_models import (  # noqa: E402
    BENCHMARK_DETECTORS, add_models_argument, build_detector, random_inputs)


@torch.no_grad()
def timed(model, inputs, repeat):
    times = []
    for _ in range(repeat):
        for images, samples in inputs:
            start = time.perf_counter()
            model.predict(images, samples)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=32)
    parser.add_argument('--method', default='repq-vit')
    parser.add_argument('--bits', type=int, default=4)
    parser.add_argument('--repeat', type=int, default=2)
    add_models_argument(parser)
    args = parser.parse_args()
    init_default_scope('mmdet')
    torch.manual_seed(0)
    print(f'W{args.bits}A{args.bits} {args.method}, {args.images} '
          f'calibration images, {torch.get_num_threads()} threads')
    for name, config, size in (BENCHMARK_DETECTORS[m] for m in args.models):
        model = build_detector(config)
        gen = torch.Generator().manual_seed(0)
        calib = [random_inputs(size, 1, gen) for _ in range(args.images)]
        evals = calib[:4]
        qcfg = QuantConfig(args.bits, args.bits, args.method)
        batch = torch.cat([images for images, _ in calib])
        batch_samples = [s for _, samples in calib for s in samples]
        calib_times, float_times = [], []
        for _ in range(args.repeat):  # interleaved, so both share drift
            # the float pass first: right after a calibration (tens of GB
            # allocated and freed) it measured from 0.93x to 1.2x of its
            # time in a fresh process
            float_times.append(sum(timed(model, [one], 1) for one in calib))
            qmodel = quantize_model(copy.deepcopy(model), qcfg)
            start = time.perf_counter()
            with torch.no_grad():
                calibrate(qmodel, qcfg,
                          lambda: qmodel.predict(batch, batch_samples))
            calib_times.append(time.perf_counter() - start)
        runs = list(zip(calib_times, float_times))
        ratio = statistics.median(c / f for c, f in runs)
        fp = timed(model, evals, args.repeat)
        qt = timed(qmodel, evals, args.repeat)
        print(f'{name}: calibration {statistics.median(calib_times):.1f} s, '
              f'float inference of the same {len(calib)} images '
              f'{statistics.median(float_times):.1f} s, ratio {ratio:.2f} '
              f'(median of {args.repeat} interleaved runs: '
              f'{", ".join(f"{c / f:.2f}" for c, f in runs)}); eval per '
              f'image float {fp * 1e3:.0f} ms, quantized {qt * 1e3:.0f} ms, '
              f'ratio {qt / fp:.2f}')


if __name__ == '__main__':
    main()
