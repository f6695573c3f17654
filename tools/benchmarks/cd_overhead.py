"""Step-time overhead of ColinearityDecayOptimWrapper against OptimWrapper.

For each model, times the same training steps (forward, backward, AdamW
step) with the plain wrapper and with CD at every step, interleaved in one
run, and prints the ratio. Models: the toy Swin Mask R-CNN backbone and
Swin-T at its real shapes (embed 96, depths 2/2/6/2), on the current device.

    python tools/benchmarks/cd_overhead.py [--size 224] [--steps 10]
"""
import argparse
import os.path as osp
import statistics
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))
import warnings  # noqa: E402

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
import torch  # noqa: E402
from mmdet.models.backbones import SwinTransformer  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402

import mmcd  # noqa: E402,F401

MODELS = {
    'toy Swin (embed 32, depths 1/1/2/1)':
    dict(embed_dims=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8]),
    'Swin-T (embed 96, depths 2/2/6/2)':
    dict(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
}


def time_steps(model, wrapper, images, steps):
    times = []
    for i in range(steps):
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = sum(f.float().square().mean() for f in model(images))
        wrapper.update_params(loss)
        if images.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available()
                        else 'cpu')
    args = parser.parse_args()
    print(f'device {args.device}, batch {args.batch}, {args.size}px, '
          f'{args.steps} timed steps per wrapper (median)')
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        model = SwinTransformer(**kwargs).to(args.device)
        optim = dict(type='AdamW', lr=1e-4, weight_decay=0.05)
        plain = build_optim_wrapper(model, dict(type='OptimWrapper',
                                                optimizer=optim))
        cd = build_optim_wrapper(model, dict(
            type='ColinearityDecayOptimWrapper', optimizer=optim,
            cd=dict(strength=0.1)))
        cd.initialize_count_status(model, 0, 10**6)
        images = torch.randn(args.batch, 3, args.size, args.size,
                             device=args.device)
        time_steps(model, plain, images, 2)  # warm-up
        time_steps(model, cd, images, 2)
        t_plain, t_cd = [], []
        for _ in range(args.steps):  # interleave to share drift
            t_plain += time_steps(model, plain, images, 1)
            t_cd += time_steps(model, cd, images, 1)
        p, c = statistics.median(t_plain), statistics.median(t_cd)
        cd_only = min(t_cd) - min(t_plain)
        print(f'{name}: plain {p * 1e3:.1f} ms, CD {c * 1e3:.1f} ms, '
              f'ratio {c / p:.4f} (overhead {100 * (c / p - 1):+.2f}%), '
              f'{len(cd.matrix_pairs)} pairs, CD step ~{cd_only * 1e3:.1f} ms')


if __name__ == '__main__':
    main()
