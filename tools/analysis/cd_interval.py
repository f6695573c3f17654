"""Does Colinearity Decay every N optimizer steps train like CD every step?

Trains the toy Swin Mask R-CNN with CD at each ``--intervals`` value (the
update multiplied by N, so the total decay is the same) and without CD, from
the same seed, then measures on ``--num-images`` toy val images what CD is
for: the pairs' alignment (mean over pairs and heads, per kind) and the
largest ``max |x|`` of the block outputs, FFN hidden activations and
attention inputs. Prints each interval's relative difference from interval
1, beside the difference CD itself makes (CD at interval 1 against no CD):
an interval is a faithful cheaper CD when the first is a small fraction of
the second. Each training is cached in ``--work-dir`` (a re-run measures
the finished ones again without training them).

    python tools/analysis/cd_interval.py [--intervals 1 4] [--epochs 12]
"""
import argparse
import os.path as osp
import statistics
import sys

import _analysis_bootstrap  # noqa: F401  (must precede OpenMMLab imports)
from mmengine.config import Config
from mmengine.runner import Runner

import mmcd  # noqa: F401
from mmcd.datasets import ensure_toy_coco
from mmcd.engine.hooks import collect_activation_stats
from mmcd.utils.runner_setup import toy_run_config

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOY_CD = osp.join(REPO, 'configs/toy/'
                  'mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd.py')
POINTS = ('output', 'ffn_hidden', 'attn_input')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--intervals', type=int, nargs='+', default=[1, 4])
    parser.add_argument('--epochs', type=int, default=12)
    parser.add_argument('--num-images', type=int, default=16)
    parser.add_argument('--data-root', default='data/toy_coco/')
    parser.add_argument('--work-dir', default='work_dirs/cd_interval')
    args = parser.parse_args()
    if 1 not in args.intervals or min(args.intervals) < 1:
        sys.exit('error: --intervals must include 1 (the reference) and '
                 'be >= 1')
    args.data_root = args.data_root.rstrip('/') + '/'
    return args


def toy_config(args, name, interval):
    cfg = Config.fromfile(TOY_CD)
    if interval is None:  # no CD
        cfg.optim_wrapper.type = 'OptimWrapper'
        cfg.optim_wrapper.pop('cd')
    else:
        cfg.optim_wrapper.cd.interval = interval
    toy_run_config(cfg, osp.join(args.work_dir, name), args.data_root,
                   args.epochs)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.experiment_name = f'cd_interval_{name}'
    return cfg


def measure(args, name, interval):
    cfg = toy_config(args, name, interval)
    checkpoint = osp.join(cfg.work_dir, f'epoch_{args.epochs}.pth')
    runner = Runner.from_cfg(cfg)
    if osp.isfile(checkpoint):
        runner.load_checkpoint(checkpoint, map_location='cpu')
    else:
        runner.train()
    stats, align, _ = collect_activation_stats(
        runner.model, runner.build_dataloader(cfg.test_dataloader),
        args.num_images)
    row = {f'align_{kind}': statistics.mean(
        a['mean'] for pair, a in align.items() if pair.endswith('.' + kind))
        for kind in ('ffn', 'vo', 'qk')}
    for point in POINTS:
        row[f'max|x| {point}'] = max(
            s['max_abs'] for key, s in stats.items()
            if key.endswith('/' + point))
    return row


def main():
    args = parse_args()
    ensure_toy_coco(args.data_root)
    rows = {'no CD': measure(args, 'no_cd', None)}
    for interval in sorted(args.intervals):
        rows[f'interval {interval}'] = measure(args, f'interval_{interval}',
                                               interval)
    reference = rows['interval 1']
    keys = list(reference)
    print('\n' + ' | '.join(['setting'] + keys))
    for name, row in rows.items():
        print(' | '.join([name] + [f'{row[k]:.3f}' for k in keys]))
    print('\nrelative difference from interval 1 (CD itself: no CD vs '
          'interval 1)')
    for name, row in rows.items():
        if name == 'interval 1':
            continue
        print(' | '.join([name] + [
            f'{100 * (row[k] / reference[k] - 1):+.1f}%' for k in keys]))


if __name__ == '__main__':
    main()
