"""What Colinearity Decay costs on the training step users run.

For each detector, built from its config (random weights and a random batch
of boxes and masks: no data, no download), times full Mask R-CNN training
steps (forward, losses, backward, the config's optimizer step) with the
plain ``OptimWrapper`` and with the config's ``ColinearityDecayOptimWrapper``,
interleaved in one run, and, inside the CD runs, the regularizer's own
update (``after_step``). Prints, per model:

* the median full step of each wrapper and their ratio (noisy on CPU: two
  medians of seconds-long steps);
* the CD update alone (``after_step`` when it acts, every ``interval``
  optimizer steps), and CD's cost per optimizer step, that update divided
  by ``interval`` (plus the no-op calls in between), as a percentage of
  the plain step: the figure the overhead target is about.

    python tools/benchmarks/cd_overhead.py [--models toy swin-t]
        [--steps 4] [--interval N]

Models: ``toy`` (the toy Swin Mask R-CNN with CD, 256 px, batch 2),
``swin-t`` (Mask R-CNN Swin-T with CD, ``configs/cd``, 800x1344, batch 2),
``vitdet-b`` (ViTDet ViT-B with CD, 1024x1024, batch 2). ``--interval``
overrides the config's ``cd.interval``. CPU by default, CUDA when present.
"""
import argparse
import copy
import os.path as osp
import statistics
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import _bootstrap  # noqa: E402,F401  (before torch: tools/_bootstrap.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

import mmcd  # noqa: E402,F401
from mmcd.utils.benchmark_models import REPO, build_detector  # noqa: E402

DETECTORS = {
    'toy': ('toy Swin Mask R-CNN + CD',
            'configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd.py',
            (256, 256)),
    'swin-t': ('Mask R-CNN Swin-T + CD', 'configs/cd/mask-rcnn_swin-t_cd.py',
               (800, 1344)),
    'vitdet-b': ('ViTDet Mask R-CNN ViT-B + CD',
                 'configs/cd/vitdet_mask-rcnn_vit-b_cd.py', (1024, 1024)),
}


def random_batch(size, batch, num_classes, gen, device):
    """Images and samples with 8 random boxes (and their box masks) each."""
    h, w = size
    images = torch.randn(batch, 3, h, w, generator=gen).to(device)
    samples = []
    for _ in range(batch):
        corner = torch.rand(8, 2, generator=gen) * torch.tensor(
            [w * 0.7, h * 0.7])
        extent = torch.rand(8, 2, generator=gen) * torch.tensor(
            [w * 0.25, h * 0.25]) + 16
        boxes = torch.cat([corner, corner + extent], 1)
        masks = np.zeros((8, h, w), dtype=np.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        sample = DetDataSample(metainfo=dict(
            img_shape=size, ori_shape=size, pad_shape=size,
            batch_input_shape=size, scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=boxes.to(device),
            labels=torch.randint(num_classes, (8, ), generator=gen).to(device),
            masks=BitmapMasks(masks, h, w))
        samples.append(sample)
    return images, samples


def timed_step(model, wrapper, batch):
    if batch[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss, _ = model.parse_losses(model.loss(*batch))
    wrapper.update_params(loss)
    if batch[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timing_after_step(regularizer, record, device):
    """Wrap the regularizer's after_step to record its wall time and
    whether it acted (it returns scalars to log only then)."""
    inner = regularizer.after_step

    def after_step(iteration, optimizer_step):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = inner(iteration, optimizer_step)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        record.append((time.perf_counter() - start, bool(out)))
        return out

    regularizer.after_step = after_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['toy', 'swin-t'],
                        choices=list(DETECTORS))
    parser.add_argument('--steps', type=int, default=4,
                        help='timed steps per wrapper (after 1 warm-up)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--interval', type=int,
                        help="override the config's cd.interval")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available()
                        else 'cpu')
    args = parser.parse_args()
    init_default_scope('mmdet')
    device = torch.device(args.device)
    print(f'device {device}, batch {args.batch}, {args.steps} timed steps '
          f'per wrapper, interleaved, {torch.get_num_threads()} threads')
    for name, config, size in (DETECTORS[m] for m in args.models):
        torch.manual_seed(0)
        cfg = Config.fromfile(osp.join(REPO, config))
        model = build_detector(config).train().to(device)
        cd_cfg = copy.deepcopy(cfg.optim_wrapper)
        if args.interval is not None:
            cd_cfg.cd.interval = args.interval
        interval = cd_cfg.cd.get('interval', 1)
        plain_cfg = copy.deepcopy(cfg.optim_wrapper)
        plain_cfg.type = 'OptimWrapper'
        plain_cfg.pop('cd')
        plain = build_optim_wrapper(model, plain_cfg)
        cd = build_optim_wrapper(model, cd_cfg)
        cd.initialize_count_status(model, 0, 10**6)
        cd_times = []
        timing_after_step(cd.regularizers[0], cd_times, device)
        gen = torch.Generator().manual_seed(0)
        num_classes = cfg.model.roi_head.bbox_head.num_classes
        batch = random_batch(size, args.batch, num_classes, gen, device)
        timed_step(model, plain, batch)  # warm-up
        timed_step(model, cd, batch)
        cd_times.clear()
        t_plain, t_cd = [], []
        for _ in range(args.steps):  # interleaved: both share drift
            t_plain.append(timed_step(model, plain, batch))
            t_cd.append(timed_step(model, cd, batch))
        p, c = statistics.median(t_plain), statistics.median(t_cd)
        acting = [t for t, acted in cd_times if acted]
        idle = [t for t, acted in cd_times if not acted] or [0.0]
        if not acting:
            sys.exit(f'{name}: CD did not act in {args.steps} timed steps '
                     f'(interval {interval}): give --steps >= {interval}')
        update = statistics.median(acting)
        per_step = update / interval + statistics.median(idle) * (
            1 - 1 / interval)
        print(f'{name} at {size[0]}x{size[1]}: plain step {p:.3f} s, CD '
              f'step {c:.3f} s (ratio {c / p:.4f}); the CD update '
              f'{1e3 * update:.1f} ms ({len(acting)} timed), interval '
              f'{interval}: {1e3 * per_step:.1f} ms per optimizer step = '
              f'{100 * per_step / p:.2f}% of the plain step '
              f'({len(cd.matrix_pairs)} pairs)')

if __name__ == '__main__':
    main()
