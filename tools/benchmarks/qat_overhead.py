"""Training-step time of QAT (fake quantization in every forward and
backward) against float training.

For the toy Swin Mask R-CNN and Mask R-CNN Swin-T at real shapes, built
from the configs (random init, random images), times the same backbone +
FPN training steps (forward, a squared-feature loss, backward, AdamW step)
of the float model and of its QAT copy (calibrated on the timing images,
quantizers on), interleaved in one run, and prints the ratio. The RPN and
RoI heads are left out: their float cost dominates a CPU detector step, so
the backbone + neck ratio is the upper bound of what QAT adds. For a method
with query-key reparameterization (ofq) it also times the same QAT without
it (``qk_reparam=False``), so the share of the ``C x C`` per-head products
shows.

    python tools/benchmarks/qat_overhead.py [--models toy swin-t]
        [--method ofq] [--bits 4] [--steps 5] [--device cuda]

CPU by default, CUDA when present.
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
from mmcd.core.quant import QAT_METHODS  # noqa: E402
from mmcd.core.quant.qat import (QATConfig, activate_qat,  # noqa: E402
                                 initialize_qat, prepare_qat)
from mmcd.utils.benchmark_models import (  # noqa: E402
    BENCHMARK_DETECTORS, add_models_argument, build_detector)


def step_times(model, optimizer, images, steps):
    times = []
    for _ in range(steps):
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = sum(f.square().mean() for f in model.extract_feat(images))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if images.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--method', default='ofq', choices=QAT_METHODS)
    parser.add_argument('--bits', type=int, default=4)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available()
                        else 'cpu')
    add_models_argument(parser)
    args = parser.parse_args()
    init_default_scope('mmdet')
    torch.manual_seed(0)
    print(f'W{args.bits}A{args.bits} {args.method} QAT vs float on '
          f'{args.device}, batch {args.batch}, {args.steps} timed steps each '
          f'(median), {torch.get_num_threads()} threads')
    for name, config, size in (BENCHMARK_DETECTORS[m] for m in args.models):
        float_model = build_detector(config).train().to(args.device)
        images = torch.rand(args.batch, 3, *size, device=args.device) * 2 - 1
        variants = {'float': float_model}
        qk_options = (True, False) if QATConfig(
            args.bits, args.bits, args.method).qk_reparam else (False, )
        for qk in qk_options:
            model = copy.deepcopy(float_model)
            cfg = QATConfig(args.bits, args.bits, args.method, qk_reparam=qk)
            prepare_qat(model, cfg)
            with torch.no_grad():
                initialize_qat(model, cfg,
                               lambda m=model: m.extract_feat(images))
            activate_qat(model)
            label = args.method if qk else \
                f'{args.method} without query-key reparam'
            variants[label] = model.train()
        runs = {}
        for label, model in variants.items():
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            step_times(model, optimizer, images, 1)  # warm-up
            runs[label] = (model, optimizer, [])
        for _ in range(args.steps):  # interleave to share drift
            for model, optimizer, times in runs.values():
                times += step_times(model, optimizer, images, 1)
        t_float = statistics.median(runs['float'][2])
        print(f'{name}: float {t_float * 1e3:.0f} ms; ' + '; '.join(
            f'{label} {statistics.median(times) * 1e3:.0f} ms, ratio '
            f'{statistics.median(times) / t_float:.2f}'
            for label, (_, _, times) in runs.items() if label != 'float'))


if __name__ == '__main__':
    main()
