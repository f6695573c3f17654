"""Activation-outlier and alignment statistics of one or more checkpoints,
with plots.

    python tools/analysis/outliers.py CONFIG CKPT [CKPT ...] \
        [--labels baseline cd] [--num-images 16] [--out-dir DIR]

Runs ``--num-images`` test images through each checkpoint and writes to
``--out-dir`` (default ``work_dirs/outliers``):

* ``max_activation.png``: per-layer ``max |x|`` (log scale), one bar per
  checkpoint, for block outputs, FFN hidden activations and attention inputs;
* ``alignment.png``: alignment per CD pair (mean over heads; 1 is what
  random matrices score) for ffn, vo and qk pairs;
* ``histogram.png``: histogram of ``|x|`` at the layer with the largest
  ``max |x|`` of any checkpoint, every checkpoint overlaid (log y);
* ``outliers.json``: all statistics.
"""
import argparse
import json
import os
import os.path as osp

import _analysis_bootstrap  # noqa: F401  (must precede OpenMMLab imports)
from mmengine.config import DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import mmcd  # noqa: E402,F401
from mmcd.core.activation_stats import model_summary  # noqa: E402
from mmcd.engine.hooks import collect_activation_stats  # noqa: E402
from mmcd.utils.runner_setup import (UserError,  # noqa: E402
                                      check_datasets, load_config, run_main)
from mmcd.visualization import (plot_alignment, plot_histogram,  # noqa: E402
                                plot_max_activation)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoints', nargs='+')
    parser.add_argument('--labels', nargs='+')
    parser.add_argument('--num-images', type=int, default=16)
    parser.add_argument('--out-dir', default='work_dirs/outliers')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    args = parser.parse_args()
    labels = args.labels or [osp.splitext(osp.basename(c))[0]
                             for c in args.checkpoints]
    if len(labels) != len(args.checkpoints):
        raise UserError(f'{len(labels)} labels for '
                        f'{len(args.checkpoints)} checkpoints')
    return args, labels


def measure(cfg, checkpoint, num_images, work_dir):
    if not osp.isfile(checkpoint):
        raise UserError(f'checkpoint {checkpoint} does not exist')
    cfg = cfg.copy()
    cfg.work_dir, cfg.load_from = work_dir, None
    runner = Runner.from_cfg(cfg)
    runner.load_checkpoint(checkpoint, map_location='cpu')
    loader = runner.build_dataloader(cfg.test_dataloader)
    if len(loader.dataset) < num_images:
        raise UserError(f'the test set has {len(loader.dataset)} images, '
                        f'fewer than --num-images {num_images}')
    stats, align, recorder = collect_activation_stats(
        runner.model, loader, num_images)
    return stats, align, recorder


def main():
    args, labels = parse_args()
    cfg = load_config(args.config, args.cfg_options)
    check_datasets(cfg, ['test_dataloader'])
    os.makedirs(args.out_dir, exist_ok=True)
    results = [measure(cfg, ckpt, args.num_images,
                       osp.join(args.out_dir, f'run_{i}'))
               for i, ckpt in enumerate(args.checkpoints)]
    paths = {name: osp.join(args.out_dir, name) for name in (
        'max_activation.png', 'alignment.png', 'histogram.png',
        'outliers.json')}
    plot_max_activation(results, labels, paths['max_activation.png'])
    plot_alignment(results, labels, paths['alignment.png'])
    worst = plot_histogram(results, labels, paths['histogram.png'])
    with open(paths['outliers.json'], 'w') as f:
        json.dump({label: dict(checkpoint=ckpt, stats=stats, alignment=align)
                   for label, ckpt, (stats, align, _) in zip(
                       labels, args.checkpoints, results)}, f, indent=2)
    print(f'\nworst layer: {worst}')
    for label, (stats, align, _) in zip(labels, results):
        summary = model_summary(stats, align)
        print(f'{label:>12}: largest max|x| {summary["max_abs"]:.2f}, largest '
              f'kurtosis {summary["kurtosis"]:.1f}, mean alignment '
              f'{summary["alignment"]:.3f}')
    print('wrote ' + ', '.join(paths.values()))


if __name__ == '__main__':
    run_main(main)
