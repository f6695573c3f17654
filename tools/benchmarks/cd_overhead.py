"""Step-time overhead of ColinearityDecayOptimWrapper against OptimWrapper.

For each model, times the same training steps (forward, backward, AdamW
step) with the plain wrapper and with CD at every step, interleaved in one
run, and prints the ratio. Models: the toy Swin Mask R-CNN backbone and
Swin-T at its real shapes (embed 96, depths 2/2/6/2) from mmdet, or timm's
``swin_tiny_patch4_window7_224`` (``--models timm``, for machines without
mmdet), on the current device.

    python tools/benchmarks/cd_overhead.py [--size 224] [--batch 2] [--steps 10]

``--size 896x1344`` gives a COCO-like detection input (timm's Swin needs
both sides divisible by 224: stride 32 times window 7).
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
from mmengine.optim import build_optim_wrapper  # noqa: E402

import mmcd  # noqa: E402,F401


def mmdet_models(size):
    from mmdet.models.backbones import SwinTransformer
    yield 'toy Swin (embed 32, depths 1/1/2/1)', SwinTransformer(
        embed_dims=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])
    yield 'Swin-T (embed 96, depths 2/2/6/2)', SwinTransformer(
        embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])


def timm_models(size):
    import timm
    yield 'timm swin_tiny_patch4_window7_224', timm.create_model(
        'swin_tiny_patch4_window7_224', img_size=size)


MODELS = {'mmdet': mmdet_models, 'timm': timm_models}


def time_steps(model, wrapper, images, steps):
    times = []
    for i in range(steps):
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(images)
        out = out if isinstance(out, (tuple, list)) else [out]
        loss = sum(f.float().square().mean() for f in out)
        wrapper.update_params(loss)
        if images.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', default='224',
                        help='side, or HxW (e.g. 896x1344)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--models', choices=sorted(MODELS), default='mmdet')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available()
                        else 'cpu')
    args = parser.parse_args()
    print(f'device {args.device}, batch {args.batch}, {args.size}px, '
          f'{args.steps} timed steps per wrapper (median)')
    size = tuple(int(v) for v in args.size.split('x'))
    size = size * 2 if len(size) == 1 else size
    torch.manual_seed(0)
    for name, model in MODELS[args.models](size):
        model = model.to(args.device)
        optim = dict(type='AdamW', lr=1e-4, weight_decay=0.05)
        plain = build_optim_wrapper(model, dict(type='OptimWrapper',
                                                optimizer=optim))
        cd = build_optim_wrapper(model, dict(
            type='ColinearityDecayOptimWrapper', optimizer=optim,
            cd=dict(strength=0.1)))
        cd.initialize_count_status(model, 0, 10**6)
        images = torch.randn(args.batch, 3, *size, device=args.device)
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
