"""Baseline vs CD vs S2D vs TWEO under post-training quantization, on the
toy Swin Mask R-CNN.

    python tools/analysis/experiment.py [--quick] [--work-dir DIR]

Trains the toy Swin Mask R-CNN from the same seed and schedule with each
regularizer, then evaluates each checkpoint in float and with PTQ at each
bit width (default W8A8, W6A6, W4A4) and method (minmax, repq-vit,
dopq-vit), measures its activation outliers, and writes to ``--work-dir``:
``results.md`` (one Markdown table, rows training x method, columns bits,
cells box AP / mask AP; plus an outlier table), ``results.json`` and the
outlier plots of tools/analysis/outliers.py. QAT rows: each trained model is
also fine-tuned with quantization-aware training (``--qat-method``, default
OFQ, at ``--qat-bits``, default W4A4, for ``--qat-epochs``) with its own
regularizer kept on, and evaluated quantized. Trainings whose checkpoint
exists are not repeated (delete the folder to start over).

Default schedule: 24 epochs (768 iterations) at AdamW lr 1e-3, chosen so
that outliers form in the baseline: at the toy config's own 12 epochs and lr
4e-4 the baseline's largest block output stayed at 4.5 (kurtosis 11), so
there was nothing for CD to remove; 36 epochs at 4e-4 reached only 6.2; 24
epochs at 1e-3 reached 18.8 (FFN-hidden kurtosis 44, max/median 48) while
still training to a usable float AP; 2e-3 diverged. ``--quick``: 2 epochs,
W8A8 and W4A4, 4 calibration images, under 10 minutes.
"""
import argparse
import json
import os
import os.path as osp
import sys
import time

import _analysis_bootstrap  # noqa: F401  (must precede OpenMMLab imports)
from mmengine.config import Config, DictAction
from mmengine.runner import Runner

import mmcd  # noqa: F401
from mmcd.core.quant import QAT_METHODS, QuantConfig, get_qat_method
from mmcd.datasets import ensure_toy_coco
from mmcd.engine import calibration_loader, evaluate, quantize_copy
from mmcd.engine.hooks import collect_activation_stats
from mmcd.engine.runner_setup import toy_run_config
from mmcd.visualization import (plot_alignment, plot_histogram,
                                plot_max_activation)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOY = osp.join(REPO, 'configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py')
TOY_CD = TOY.replace('toy-coco.py', 'toy-coco_cd.py')
#: optim wrapper of each training, on top of the toy config's AdamW; CD as
#: the toy CD config has it
TRAININGS = {
    'baseline': dict(type='OptimWrapper'),
    'cd': dict(type='ColinearityDecayOptimWrapper',
               cd=Config.fromfile(TOY_CD).optim_wrapper.cd.to_dict()),
    's2d': dict(type='ColinearityDecayOptimWrapper',
                s2d=dict(strength=5e-4)),
    'tweo': dict(type='ColinearityDecayOptimWrapper',
                 tweo=dict(weight=0.01)),
}
METHODS = ('minmax', 'repq-vit', 'dopq-vit')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--work-dir', default='work_dirs/experiment')
    parser.add_argument('--data-root', default='data/toy_coco/')
    parser.add_argument('--trainings', nargs='+', default=list(TRAININGS),
                        choices=list(TRAININGS))
    parser.add_argument('--methods', nargs='+', default=list(METHODS),
                        choices=METHODS)
    parser.add_argument('--bits', nargs='+', type=int)
    parser.add_argument('--epochs', type=int)
    parser.add_argument('--lr', type=float, default=1e-3,
                        help='AdamW lr of every training (default 1e-3, '
                        'high enough for outliers to form)')
    parser.add_argument('--calib-images', type=int)
    parser.add_argument('--stat-images', type=int, default=8)
    parser.add_argument('--qat-method', default='ofq', choices=QAT_METHODS)
    parser.add_argument('--qat-bits', nargs='*', type=int,
                        help='QAT bit widths (default 4; none: no QAT rows)')
    parser.add_argument('--qat-epochs', type=int)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override toy config settings of every '
                        'training, key=value')
    args = parser.parse_args()
    args.bits = args.bits or ([8, 4] if args.quick else [8, 6, 4])
    args.epochs = args.epochs or (2 if args.quick else 24)
    args.calib_images = args.calib_images or (4 if args.quick else 16)
    args.qat_bits = [4] if args.qat_bits is None else args.qat_bits
    args.qat_epochs = args.qat_epochs or (1 if args.quick else 2)
    if not set(args.qat_bits) <= set(args.bits):
        parser.error(f'--qat-bits {args.qat_bits} must be among --bits '
                     f'{args.bits} (the table has one column per bit width)')
    args.data_root = args.data_root.rstrip('/') + '/'
    return args


def toy_config(args, training):
    cfg = Config.fromfile(TOY)
    cfg.optim_wrapper.optimizer.lr = args.lr
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.optim_wrapper.update(TRAININGS[training])
    toy_run_config(cfg, osp.join(args.work_dir, training), args.data_root,
                   args.epochs)
    cfg.experiment_name = f'experiment_{training}'
    cfg.visualizer.name = cfg.experiment_name
    return cfg


def run_training(args, training):
    cfg = toy_config(args, training)
    checkpoint = osp.join(cfg.work_dir, f'epoch_{args.epochs}.pth')
    if osp.isfile(checkpoint):
        cfg.load_from = checkpoint
    runner = Runner.from_cfg(cfg)
    if osp.isfile(checkpoint):
        runner.load_checkpoint(checkpoint, map_location='cpu')
    else:
        runner.train()
    model = runner.model
    loop = runner.test_loop
    row = {'float': evaluate(model, loop)}
    loader = calibration_loader(cfg, args.calib_images)
    for method in args.methods:
        for bits in args.bits:
            qmodel = quantize_copy(model, QuantConfig(bits, bits, method),
                                   loader, args.calib_images)
            row[f'{method}/W{bits}A{bits}'] = evaluate(qmodel, loop)
    stats = collect_activation_stats(model, runner.build_dataloader(
        cfg.test_dataloader), args.stat_images)
    for bits in args.qat_bits:
        row[f'qat-{args.qat_method}/W{bits}A{bits}'] = run_qat(
            args, training, checkpoint, bits)
    return row, stats


def run_qat(args, training, checkpoint, bits):
    """Fine-tune ``checkpoint`` with QAT at ``bits`` (the training's
    regularizer on, a tenth of its lr, constant) and test it quantized;
    returns the metrics plus the last oscillation fraction."""
    cfg = toy_config(args, training)
    cfg.work_dir = osp.join(cfg.work_dir, f'qat-{args.qat_method}_w{bits}')
    cfg.experiment_name += f'_qat{bits}'
    cfg.visualizer.name = cfg.experiment_name
    epochs = args.qat_epochs
    cfg.train_cfg.max_epochs = epochs
    cfg.train_cfg.val_begin = epochs + 1  # tested below, not validated
    cfg.param_scheduler = []
    cfg.optim_wrapper.optimizer.lr /= 10
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook',
                                        interval=epochs)
    cfg.model = dict(type='QATDetector', detector=cfg.model,
                     qat=dict(w_bits=bits, a_bits=bits,
                              method=args.qat_method))
    cfg.optim_wrapper.paramwise_cfg.custom_keys['quantizer.'] = dict(
        decay_mult=0.0)
    cfg.custom_hooks = [
        dict(type='QuantAwareTrainingHook',
             calib=dict(num_images=args.calib_images)),
        dict(type='QuantOscillationHook', window=8)
    ]
    cga = get_qat_method(args.qat_method).cga
    if cga is not None:  # the method as published (OFQ anneals)
        cfg.custom_hooks.append(
            dict(type='ConfidenceGuidedAnnealingHook', **cga))
    qat_checkpoint = osp.join(cfg.work_dir, f'epoch_{epochs}.pth')
    done = osp.isfile(qat_checkpoint)
    cfg.load_from = qat_checkpoint if done else checkpoint
    runner = Runner.from_cfg(cfg)
    if not done:
        runner.train()
    metrics = runner.test()
    oscillation = runner.message_hub.get_scalar('train/qat_oscillation')
    metrics['qat_oscillation'] = float(oscillation.current()) \
        if oscillation is not None and not done else None
    return metrics


def cell(metrics):
    return (f'{100 * metrics["coco/bbox_mAP"]:.1f} / '
            f'{100 * metrics["coco/segm_mAP"]:.1f}')


def markdown(args, rows, stats, seconds):
    bits = [f'W{b}A{b}' for b in args.bits]
    lines = [
        '# Baseline vs CD vs S2D vs TWEO under PTQ (toy Swin Mask R-CNN)',
        '',
        f'`python tools/analysis/experiment.py'
        f'{" --quick" if args.quick else ""}`: {args.epochs} epochs at lr '
        f'{args.lr:g} on the toy set, calibration on {args.calib_images} '
        'train images, '
        f'{seconds / 60:.0f} min on this machine. Cells: box AP / mask AP '
        '(COCO AP@[.5:.95], %) on the toy val set.', '',
        '| training | PTQ | float | ' + ' | '.join(bits) + ' |',
        '|---|---|---|' + '---|' * len(bits)
    ]
    methods = list(args.methods) + (
        [f'qat-{args.qat_method}'] if args.qat_bits else [])
    for training, row in rows.items():
        for method in methods:
            cells = [cell(row[f'{method}/{b}']) if f'{method}/{b}' in row
                     else '–' for b in bits]
            lines.append(f'| {training} | {method} | {cell(row["float"])} | '
                         + ' | '.join(cells) + ' |')
    if args.qat_bits:
        lines += ['', f'QAT rows: {args.qat_epochs} epoch(s) of '
                  f'{args.qat_method.upper()} fine-tuning from each trained '
                  'model (its regularizer on, lr / 10), calibration-'
                  f'initialised on {args.calib_images} images.']
    lines += ['', '## Activation outliers (float model, '
              f'{args.stat_images} val images)', '',
              '| training | largest max abs | largest kurtosis | '
              'largest max/median | mean alignment |', '|---|---|---|---|---|',
              ]
    for training, (point_stats, align, _) in stats.items():
        peak = max(v['max_abs'] for v in point_stats.values())
        kurt = max(v['kurtosis'] for v in point_stats.values())
        # zero-padded attention inputs can have median 0: finite ratios only
        ratio = max((v['max_over_median'] for v in point_stats.values()
                     if v['max_over_median'] != float('inf')), default=0.0)
        mean_align = sum(a['mean'] for a in align.values()) / len(align)
        lines.append(f'| {training} | {peak:.2f} | {kurt:.1f} | '
                     f'{ratio:.0f} | {mean_align:.2f} |')
    return '\n'.join(lines) + '\n'


def main():
    args = parse_args()
    start = time.time()
    os.makedirs(args.work_dir, exist_ok=True)
    if args.data_root == 'data/toy_coco/':
        ensure_toy_coco(args.data_root)
    rows, stats = {}, {}
    for training in args.trainings:
        rows[training], stats[training] = run_training(args, training)
    labels = list(stats)
    results = list(stats.values())
    plot_max_activation(results, labels,
                        osp.join(args.work_dir, 'max_activation.png'))
    plot_alignment(results, labels, osp.join(args.work_dir, 'alignment.png'))
    plot_histogram(results, labels, osp.join(args.work_dir, 'histogram.png'))
    with open(osp.join(args.work_dir, 'results.json'), 'w') as f:
        json.dump(dict(args=vars(args), metrics=rows,
                       outliers={k: dict(stats=v[0], alignment=v[1])
                                 for k, v in stats.items()}), f, indent=2)
    table = markdown(args, rows, stats, time.time() - start)
    with open(osp.join(args.work_dir, 'results.md'), 'w') as f:
        f.write(table)
    print('\n' + table)
    print(f'wrote {args.work_dir}/results.md, results.json and plots')


if __name__ == '__main__':
    sys.exit(main())
