"""Baseline vs CD vs S2D vs TWEO under post-training quantization, on the
toy Swin Mask R-CNN, over seeds, with a strength sweep; cached and resumable.

    python tools/analysis/experiment.py [--quick] [--seeds 3] [--sweep]
        [--work-dir DIR]

Trains the toy Swin Mask R-CNN from the same schedule with each regularizer
and each seed (``--seeds N``: seeds 0..N-1), then evaluates each checkpoint
in float and with PTQ at each bit width (default W8A8, W6A6, W4A4) and
method (minmax, repq-vit, dopq-vit), measures its activation outliers, and
fine-tunes it with QAT (``--qat-method``, default OFQ, at ``--qat-bits``,
default W4A4, its regularizer kept on). The ``--recon-trainings`` (default
baseline and CD) are also quantized with the reconstruction methods
(``--recon-methods``, default qdrop and aphq-vit, ``--recon-iters`` per
unit and per MLP, default 500) and repq-vit at ``--recon-bits`` (default
W4A4, W3A3), each cell with every unit's output error before and after
reconstruction and its wall time. ``--sweep`` adds trainings (seed 0)
at ``--cd-strengths`` and ``--tweo-weights`` (strength 0 is the baseline),
evaluated in float and W4A4 (repq-vit, minmax), for the trade-off figure.
S2D trains with the paper's options, or ``--s2d-options`` over them.

Every training and every evaluation is a cell written as it finishes
(:class:`mmcd.utils.result_cache.ResultCache` in ``--work-dir/cache``);
a re-run skips finished cells, an interrupted training resumes from its
last checkpoint, and a work dir written by another code version or with
other settings is refused with a message. Writes ``results.md`` (cells
``mean ± std`` over seeds of box AP / mask AP, and the paired difference of
each regularizer to the baseline of the same seed), ``results.json``,
outlier plots, and with ``--sweep`` ``tradeoff.png`` and its table. The
report ends with the correlation (Pearson, Spearman) of each trained
model's W4A4 drop with its float outlier summary. ``--report-from
RESULTS_JSON`` writes a finished run's report again with this code.

Default schedule: 24 epochs (768 iterations) at AdamW lr 1e-3, chosen so
that outliers form in the baseline: at the toy config's own 12 epochs and lr
4e-4 the baseline's largest block output stayed at 4.5 (kurtosis 11), so
there was nothing for CD to remove; 24 epochs at 1e-3 reached 18.8 while
still training to a usable float AP; 2e-3 diverged. The toy set gets
``--val-images`` (default 64) validation images, in its own data root.
``--quick``: 2 epochs, one seed, W8A8 and W4A4, 4 calibration images, 16
val images, under 10 minutes.
"""
import argparse
import hashlib
import json
import os
import os.path as osp
import shlex
import statistics
import sys
import time

import _analysis_bootstrap  # noqa: F401  (must precede OpenMMLab imports)
import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import mmcd  # noqa: E402,F401
from mmcd.core.activation_stats import model_summary  # noqa: E402
from mmcd.core.quant import (QAT_METHODS, QuantConfig,  # noqa: E402
                             get_method, get_qat_method)
from mmcd.core.regularizers import build_regularizer  # noqa: E402
from mmcd.datasets import ToyCocoSpec, ensure_toy_coco  # noqa: E402
from mmcd.engine import (CalibrationOptions, evaluate,  # noqa: E402
                         quantize_copy)
from mmcd.engine.hooks import collect_activation_stats  # noqa: E402
from mmcd.utils.result_cache import ResultCache, code_version  # noqa
from mmcd.utils.runner_setup import (UserError,  # noqa: E402
                                      add_rng_state_hook, resume_latest,
                                      run_main, toy_run_config)
from mmcd.visualization import (plot_alignment, plot_histogram,  # noqa
                                plot_max_activation, plot_tradeoff)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOY = osp.join(REPO, 'configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py')
TOY_CD = TOY.replace('toy-coco.py', 'toy-coco_cd.py')
CD_STRENGTH = Config.fromfile(TOY_CD).optim_wrapper.cd.strength
#: regularizer options of each training, on top of the toy config's AdamW
#: (CD as the toy CD config has it)
REGULARIZERS = {
    'baseline': {},
    'cd': dict(cd=Config.fromfile(TOY_CD).optim_wrapper.cd.to_dict()),
    's2d': dict(s2d=dict(strength=5e-4)),
    'tweo': dict(tweo=dict(weight=0.01)),
}
#: the option of a regularizer that ``--sweep`` varies (``'cd@0.5'``)
SWEPT_OPTIONS = dict(cd='strength', tweo='weight')
METHODS = ('minmax', 'repq-vit', 'dopq-vit')
SWEEP_METHODS = ('repq-vit', 'minmax')
#: the reconstruction methods, and the calibration-only method they are
#: compared with at the same bits
RECON_METHODS = ('qdrop', 'aphq-vit')
RECON_REFERENCE = 'repq-vit'
#: |x| samples per probe point kept for the histogram (a uniform draw of
#: the recorder's, stored in half precision)
PLOT_SAMPLES = 1 << 14


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--work-dir', default='work_dirs/experiment')
    parser.add_argument('--data-root', help='a toy set to use as it is '
                        '(default: data/toy_coco_val{N}/, generated with N '
                        '= --val-images val images)')
    parser.add_argument('--val-images', type=int)
    parser.add_argument('--seeds', type=int)
    parser.add_argument('--trainings', nargs='+', default=list(REGULARIZERS),
                        choices=list(REGULARIZERS))
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
    parser.add_argument('--recon-trainings', nargs='*',
                        default=['baseline', 'cd'], choices=list(REGULARIZERS),
                        help='trainings also quantized with --recon-methods '
                        '(none: no reconstruction cells)')
    parser.add_argument('--recon-methods', nargs='+',
                        default=list(RECON_METHODS), choices=RECON_METHODS)
    parser.add_argument('--recon-bits', nargs='+', type=int,
                        help='bit widths of the reconstruction cells '
                        '(default 4 3)')
    parser.add_argument('--recon-iters', type=int,
                        help='reconstruction iterations per unit and per '
                        'MLP (default 500; the papers: 20000)')
    parser.add_argument('--sweep', action='store_true',
                        help='also train seed 0 at each --cd-strengths and '
                        '--tweo-weights value (the trade-off figure)')
    parser.add_argument('--cd-strengths', nargs='+', type=float,
                        default=[0, CD_STRENGTH / 8, CD_STRENGTH / 2,
                                 CD_STRENGTH, 2 * CD_STRENGTH])
    parser.add_argument('--tweo-weights', nargs='+', type=float,
                        default=[0, 0.003, 0.01, 0.03, 0.1])
    parser.add_argument('--s2d-options', nargs='+', action=DictAction,
                        metavar='KEY=VALUE',
                        help="the s2d training's S2D options over the "
                        "paper's (e.g. tau=0.5: the paper's tau 0.95 "
                        'selects no matrix of the toy Swin); part of the '
                        'settings')
    parser.add_argument('--load-from', metavar='CKPT',
                        help='every training fine-tunes this checkpoint '
                        '(e.g. the pretraining of docs/experiment/'
                        'planted.md) instead of starting from random '
                        'weights; its sha256 is part of the settings')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override toy config settings of every '
                        'training, key=value')
    parser.add_argument('--report-from', metavar='RESULTS_JSON',
                        help="write the report of a finished run's "
                        'results.json again with this code (into '
                        '--work-dir; nothing is re-run, every other option '
                        'is the run\'s)')
    args = parser.parse_args()
    if args.report_from:
        return args
    args.bits = args.bits or ([8, 4] if args.quick else [8, 6, 4])
    args.epochs = args.epochs or (2 if args.quick else 24)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.val_images = args.val_images or (16 if args.quick else 64)
    args.calib_images = args.calib_images or (4 if args.quick else 16)
    args.qat_bits = [4] if args.qat_bits is None else args.qat_bits
    args.qat_epochs = args.qat_epochs or (1 if args.quick else 2)
    args.recon_bits = args.recon_bits or ([4] if args.quick else [4, 3])
    args.recon_iters = args.recon_iters or (20 if args.quick else 500)
    args.recon_trainings = [t for t in args.recon_trainings
                            if t in args.trainings]
    if not set(args.qat_bits) <= set(args.bits):
        parser.error(f'--qat-bits {args.qat_bits} must be among --bits '
                     f'{args.bits} (the table has one column per bit width)')
    if args.sweep and 4 not in args.bits:
        parser.error('--sweep reports W4A4: keep 4 in --bits')
    if args.s2d_options:  # checked now, not when the s2d training starts
        try:
            build_regularizer(dict(REGULARIZERS['s2d']['s2d'], type='s2d',
                                   **args.s2d_options))
        except ValueError as err:
            parser.error(f'--s2d-options: {err}')
    args.generate_data = args.data_root is None
    if not args.generate_data:
        args.val_images = None  # the given set's own
    args.data_root = (args.data_root or
                      f'data/toy_coco_val{args.val_images}/').rstrip('/') + '/'
    args.load_from_sha256 = None
    if args.load_from:
        if not osp.isfile(args.load_from):
            raise UserError(f'--load-from {args.load_from} does not exist')
        with open(args.load_from, 'rb') as f:
            args.load_from_sha256 = hashlib.file_digest(
                f, 'sha256').hexdigest()
    return args


def settings_of(args):
    """What the cached results depend on (a resumed run must match)."""
    keys = ('epochs', 'lr', 'calib_images', 'stat_images', 'val_images',
            'data_root', 'cfg_options', 'qat_method', 'qat_epochs',
            'recon_iters', 'load_from', 'load_from_sha256', 's2d_options')
    return {k: getattr(args, k) for k in keys}


# ----------------------------------------------------------- trainings --
def regularizers_of(training):
    """``'cd'``, ``'cd@0.5'`` (a sweep point; strength 0 is the baseline),
    ``'tweo@0.03'``... -> the optim wrapper's regularizer options."""
    name, _, value = training.partition('@')
    if not value:
        return REGULARIZERS[name]
    value = float(value)
    if value == 0:
        return {}
    option = SWEPT_OPTIONS[name]
    return {name: dict(REGULARIZERS[name][name], **{option: value})}


def canonical(training):
    """Sweep points equal to a main training share its cells."""
    options = regularizers_of(training)
    for name, main in REGULARIZERS.items():
        if options == main:
            return name
    return training


def toy_config(args, training, seed):
    cfg = Config.fromfile(TOY)
    cfg.optim_wrapper.optimizer.lr = args.lr
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    options = regularizers_of(training)
    if 's2d' in options and args.s2d_options:
        options = dict(options, s2d=dict(options['s2d'], **args.s2d_options))
    cfg.optim_wrapper.update(dict(type='ColinearityDecayOptimWrapper',
                                  **options) if options else
                             dict(type='OptimWrapper'))
    name = f'{training}_s{seed}'
    toy_run_config(cfg, osp.join(args.work_dir, name), args.data_root,
                   args.epochs)
    # checkpoints along the way, so an interrupted training resumes
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', interval=max(1, args.epochs // 6),
        max_keep_ckpts=1)
    cfg.randomness = dict(seed=seed)
    cfg.load_from = args.load_from
    add_rng_state_hook(cfg)  # a resumed training continues bit-exactly
    cfg.experiment_name = f'experiment_{name}'
    cfg.visualizer.name = cfg.experiment_name
    return cfg


def train(args, cache, training, seed):
    """The checkpoint of ``training`` at ``seed`` (trained unless cached;
    resumed from its last checkpoint if a run was interrupted)."""
    def compute():
        cfg = toy_config(args, training, seed)
        resume_latest(cfg)  # the work dir's last checkpoint, if any
        start = time.time()
        Runner.from_cfg(cfg).train()
        return dict(checkpoint=osp.join(cfg.work_dir,
                                        f'epoch_{args.epochs}.pth'),
                    seconds=time.time() - start)
    return cache.cell(f'train/{training}/s{seed}', compute)['checkpoint']


def loaded_runner(args, training, seed, checkpoint):
    cfg = toy_config(args, training, seed)
    cfg.work_dir, cfg.load_from = osp.join(cfg.work_dir, 'eval'), None
    runner = Runner.from_cfg(cfg)
    runner.load_checkpoint(checkpoint, map_location='cpu')
    return cfg, runner


def cell_names(methods, bits):
    return [f'{m}/W{b}A{b}' for m in methods for b in bits]


def evaluate_training(args, cache, training, seed, methods, bits, main):
    """Float, PTQ (``methods`` x ``bits``), outlier statistics and, for a
    ``main`` training (not a sweep point), the QAT cells and the
    reconstruction cells (a ``--recon-trainings`` training) of one trained
    model; returns ``{cell name: metrics}`` and the statistics."""
    checkpoint = train(args, cache, training, seed)
    prefix = f'eval/{training}/s{seed}'
    names = ['float'] + cell_names(methods, bits)
    if main and training in args.recon_trainings:
        names += [n for n in cell_names(
            (RECON_REFERENCE, *args.recon_methods), args.recon_bits)
            if n not in names]
    pending = [n for n in names if cache.get(f'{prefix}/{n}') is None]
    stats_key = f'{prefix}/stats'
    state = {}

    def runner_of():  # built once, only when a cell needs it
        if not state:
            state['cfg'], state['runner'] = loaded_runner(
                args, training, seed, checkpoint)
        return state['cfg'], state['runner']

    for name in pending:
        cfg, runner = runner_of()
        if name == 'float':
            value = metrics_of(evaluate(runner.model, runner.test_loop))
        else:
            method, spec = name.split('/')
            b = int(spec[1:spec.index('A')])
            value = ptq_cell(args, cfg, runner, QuantConfig(
                b, b, method, reconstruction=recon_options(args, method)))
        cache.put(f'{prefix}/{name}', value)
    if cache.get(stats_key) is None:
        cfg, runner = runner_of()
        stats, align, recorder = collect_activation_stats(
            runner.model, runner.build_dataloader(cfg.test_dataloader),
            args.stat_images)
        if seed == 0:  # the histogram's (a small file: the cache of a
            # long run is kept across machines)
            torch.save({n: recorder.samples(n)[:PLOT_SAMPLES].half()
                        for n in stats},
                       osp.join(cache.folder, 'cells',
                                f'samples_{training}_s{seed}.pt'))
        cache.put(stats_key, dict(stats=stats, alignment=align))
    row = {n: cache.get(f'{prefix}/{n}') for n in names}
    if main:
        for b in args.qat_bits:
            row[f'qat-{args.qat_method}/W{b}A{b}'] = cache.cell(
                f'{prefix}/qat-{args.qat_method}/W{b}A{b}',
                lambda b=b: run_qat(args, training, seed, checkpoint, b))
    return row, cache.get(stats_key)


def metrics_of(metrics):
    return {k: float(v) for k, v in metrics.items()}


def recon_options(args, method):
    """The reconstruction's length for a method that reconstructs (None:
    calibration only)."""
    if get_method(method).reconstruction is None:
        return None
    return dict(iters=args.recon_iters, mlp_iters=args.recon_iters)


def ptq_cell(args, cfg, runner, quant_cfg):
    """Metrics of ``runner.model`` quantized with ``quant_cfg``; with a
    reconstruction also its wall time (quantization, calibration and
    reconstruction) and each unit's output error ``[before, after]``."""
    batch = CalibrationOptions(args.calib_images).batch(cfg)
    summary = {}
    start = time.time()
    quant_model = quantize_copy(runner.model, quant_cfg, batch, summary)
    seconds = time.time() - start
    value = metrics_of(evaluate(quant_model, runner.test_loop))
    if 'reconstruction_stats' in summary:
        value['seconds'] = seconds
        value['units'] = {
            unit: [s['loss_before'], s['loss_after']]
            for unit, s in summary['reconstruction_stats'].items()}
    return value


class CachedSamples:
    """The ``|x|`` samples saved with a stats cell, as the histogram plot
    reads a recorder."""

    def __init__(self, path):
        self.values = torch.load(path)

    def samples(self, name):
        return self.values[name].float()


def run_qat(args, training, seed, checkpoint, bits):
    """Fine-tune ``checkpoint`` with QAT at ``bits`` (the training's
    regularizer on, a tenth of its lr, constant) and test it quantized;
    returns the metrics plus the last oscillation fraction."""
    cfg = toy_config(args, training, seed)
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
    cfg.load_from = checkpoint
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = metrics_of(runner.test())
    oscillation = runner.message_hub.get_scalar('train/qat_oscillation')
    metrics['qat_oscillation'] = float(oscillation.current()) \
        if oscillation is not None else None
    return metrics


# ------------------------------------------------------------- reports --
def mean_std(values, scale=100.0, digits=1):
    values = [scale * v for v in values]
    if len(values) == 1:
        return f'{values[0]:.{digits}f}'
    return (f'{statistics.mean(values):.{digits}f} ± '
            f'{statistics.stdev(values):.{digits}f}')


def ap_cell(metrics_list, paired_with=None):
    """``box / mask`` AP (%), mean ± std over seeds; with ``paired_with``
    (the baseline's metrics, seed by seed) the per-seed differences."""
    parts = []
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        values = [m[key] for m in metrics_list]
        if paired_with is not None:
            values = [v - b[key] for v, b in zip(values, paired_with)]
        parts.append(mean_std(values))
    return ' / '.join(parts)


def recon_lines(args, rows):
    """The reconstruction table: AP of each method at each
    ``--recon-bits`` and its paired difference to float, the CD −
    baseline difference, the median per-unit output-error reduction and
    the wall time."""
    trainings = [t for t in args.recon_trainings if t in rows]
    if not trainings:
        return []
    bits = [f'W{b}A{b}' for b in args.recon_bits]
    methods = [RECON_REFERENCE, *args.recon_methods]
    lines = [
        '', f'## Reconstruction PTQ ({args.recon_iters} iterations per unit '
        f'and per MLP, {args.calib_images} calibration images)', '',
        'Cells as above; "− float": the paired difference to float AP of the '
        'same seed; unit error: the median over units of the relative '
        'reduction of the output error by reconstruction, mean over bits '
        'and seeds; '
        'time: quantization + calibration + reconstruction, mean over seeds '
        '(the run\'s thread count, 1 in the shipped run).', '',
        '| training | method | ' + ' | '.join(
            f'{b} | {b} − float' for b in bits) +
        ' | unit error | time (s) |',
        '|---|---|' + '---|---|' * len(bits) + '---|---|']
    for training in trainings:
        per_seed = rows[training]
        floats = [r['float'] for r in per_seed]
        for method in methods:
            cells, reductions, seconds = [], [], []
            for b in bits:
                results = [r[f'{method}/{b}'] for r in per_seed]
                cells += [ap_cell(results), ap_cell(results, floats)]
                for result in results:
                    if 'units' in result:
                        reductions.append(statistics.median(
                            1 - after / before for before, after in
                            result['units'].values() if before > 0))
                        seconds.append(result['seconds'])
            reduction = (f'{100 * statistics.mean(reductions):.0f}%'
                         if reductions else '–')
            time_cell = (f'{statistics.mean(seconds):.0f}'
                         if seconds else '–')
            lines.append(f'| {training} | {method} | ' + ' | '.join(cells) +
                         f' | {reduction} | {time_cell} |')
    if 'baseline' in trainings:
        base = rows['baseline']
        for training in trainings:
            if training == 'baseline':
                continue
            for method in methods:
                cells = []
                for b in bits:
                    column = f'{method}/{b}'
                    cells += [ap_cell([r[column] for r in rows[training]],
                                      [r[column] for r in base]), '']
                lines.append(f'| {training} − baseline | {method} | ' +
                             ' | '.join(cells) + ' | | |')
    return lines


def outlier_summary(stats):
    return model_summary(stats['stats'], stats['alignment'])


def markdown(args, rows, stats, sweep, provenance):
    """The report; ``provenance`` says which invocation computed it."""
    bits = [f'W{b}A{b}' for b in args.bits]
    seeds = list(range(args.seeds))
    val_images = args.val_images or "the given set's"
    lines = [
        '# Baseline vs CD vs S2D vs TWEO under PTQ (toy Swin Mask R-CNN)',
        '',
        f'{provenance}: {args.epochs} epochs at lr '
        f'{args.lr:g}, seeds {seeds}, calibration on {args.calib_images} '
        f'train images, {val_images} val images. '
        'Cells: box AP / mask AP (COCO AP@[.5:.95], %), mean ± std '
        'over seeds; rows "− baseline": the difference to the baseline of '
        'the same seed, mean ± std over seeds.', '',
        '| training | PTQ | float | ' + ' | '.join(bits) + ' |',
        '|---|---|---|' + '---|' * len(bits)
    ]
    methods = list(args.methods) + (
        [f'qat-{args.qat_method}'] if args.qat_bits else [])
    base = rows.get('baseline')
    for training, per_seed in rows.items():
        for method in methods:
            for paired in ([False, True] if base and training != 'baseline'
                           else [False]):
                label = f'{training} − baseline' if paired else training
                cells = []
                for column in ['float'] + [f'{method}/{b}' for b in bits]:
                    if column not in per_seed[0]:
                        cells.append('–')
                        continue
                    ref = [r[column] for r in base] if paired else None
                    cells.append(ap_cell([r[column] for r in per_seed], ref))
                lines.append(f'| {label} | {method} | ' + ' | '.join(cells) +
                             ' |')
    lines += ['', f'## Activation outliers (float model, {args.stat_images} '
              'val images; mean ± std over seeds)', '',
              '| training | largest max abs | largest kurtosis | '
              'mean alignment |', '|---|---|---|---|']
    for training, per_seed in stats.items():
        summaries = [outlier_summary(s) for s in per_seed]
        lines.append(
            f'| {training} | ' + ' | '.join(
                mean_std([s[k] for s in summaries], 1.0, 2)
                for k in ('max_abs', 'kurtosis', 'alignment')) + ' |')
    lines += recon_lines(args, rows)
    if sweep:
        lines += ['', '## Strength sweep (seed 0; W4A4)', '',
                  '| training | float | W4A4 repq-vit | W4A4 minmax | '
                  'largest max abs | largest kurtosis | mean alignment |',
                  '|---|---|---|---|---|---|---|']
        for training, (row, stat) in sweep.items():
            summary = outlier_summary(stat)
            lines.append(
                f'| {training} | {ap_cell([row["float"]])} | '
                f'{ap_cell([row["repq-vit/W4A4"]])} | '
                f'{ap_cell([row["minmax/W4A4"]])} | '
                f'{summary["max_abs"]:.2f} | {summary["kurtosis"]:.2f} | '
                f'{summary["alignment"]:.2f} |')
    lines += correlation_lines(args, rows, stats, sweep)
    return '\n'.join(lines) + '\n'


def ranks(values):
    """Ranks 0..n-1 of ``values``, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while (end + 1 < len(order)
               and values[order[end + 1]] == values[order[start]]):
            end += 1
        for i in order[start:end + 1]:
            result[i] = (start + end) / 2
        start = end + 1
    return result


def correlation(x, y):
    """``'r / rho'``: Pearson's r and Spearman's rho (Pearson's r of the
    ranks); ``'–'`` when either is constant."""
    try:
        return (f'{statistics.correlation(x, y):+.2f} / '
                f'{statistics.correlation(ranks(x), ranks(y)):+.2f}')
    except statistics.StatisticsError:
        return '–'


def trained_models(rows, stats, sweep, column):
    """``(row, outlier stats)`` of every distinct trained model that has
    ``column``: each main training at each seed, then each sweep point
    that is not a main training (``canonical``)."""
    models = [(row, stat) for training in rows
              for row, stat in zip(rows[training], stats[training])]
    models += [(row, stat) for point, (row, stat) in sweep.items()
               if canonical(point) not in rows]
    return [(row, stat) for row, stat in models if column in row]


def correlation_lines(args, rows, stats, sweep):
    """What the low-bit drop follows: over every trained model of the run,
    the correlation of its drop at the lowest ``--bits`` (``repq-vit``,
    or the first method) with its float outlier summary."""
    method = RECON_REFERENCE if RECON_REFERENCE in args.methods \
        else args.methods[0]
    column = f'{method}/W{min(args.bits)}A{min(args.bits)}'
    models = trained_models(rows, stats, sweep, column)
    if len(models) < 3:
        return []
    summaries = [outlier_summary(stat) for _, stat in models]
    drops = {key: [100 * (row[column][key] - row['float'][key])
                   for row, _ in models]
             for key in ('coco/bbox_mAP', 'coco/segm_mAP')}
    lines = ['', f'## What the {column} drop follows ({len(models)} '
             'trained models)', '',
             'Over every trained model of the run (each training and seed, '
             'and each sweep point that is not one of them): the '
             'correlation of its drop (quantized − float AP, negative: '
             'a loss) with its float outlier summary, Pearson r / '
             "Spearman's rho. A negative r: the larger the summary, the "
             'larger the loss.', '',
             '| float outlier summary | box drop | mask drop |',
             '|---|---|---|']
    for key, label in (('kurtosis', 'largest kurtosis'),
                       ('max_abs', 'largest max abs'),
                       ('alignment', 'mean alignment')):
        values = [summary[key] for summary in summaries]
        lines.append(f'| {label} | ' + ' | '.join(
            correlation(values, drops[k]) for k in drops) + ' |')
    return lines


def rerender(args):
    """``--report-from``: the report of a finished run's ``results.json``
    written again by this code (no cell is re-run; the plots are the
    run's)."""
    if osp.abspath(args.work_dir) == osp.dirname(
            osp.abspath(args.report_from)):
        raise UserError(f'--work-dir {args.work_dir} holds the run\'s own '
                        'results.md: give another --work-dir')
    try:
        with open(args.report_from) as f:
            results = json.load(f)
        run_args = argparse.Namespace(**results['args'])
        rows, stats = results['metrics'], results['outliers']
        sweep = {point: (v['metrics'], v['outliers'])
                 for point, v in results.get('sweep', {}).items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f'--report-from {args.report_from}: not a '
                        f'results.json of this tool ({err!r})') from None
    command = results.get('command')
    provenance = (
        f'Rendered by `experiment.py --report-from` from the results of '
        f'code version {results.get("version", "unknown")}' +
        (f' (`python tools/analysis/experiment.py {command}`)'
         if command else ''))
    try:
        table = markdown(run_args, rows, stats, sweep, provenance)
    except AttributeError as err:  # an option the run's version lacked
        raise UserError(f'--report-from {args.report_from}: written by a '
                        f'version of this tool without --'
                        f'{err.name.replace("_", "-")}; render it with that '
                        'version') from None
    os.makedirs(args.work_dir, exist_ok=True)
    with open(osp.join(args.work_dir, 'results.md'), 'w') as f:
        f.write(table)
    print('\n' + table)
    print(f'wrote {args.work_dir}/results.md')


def main():
    args = parse_args()
    if args.report_from:
        return rerender(args)
    start = time.time()
    os.makedirs(args.work_dir, exist_ok=True)
    try:
        cache = ResultCache(osp.join(args.work_dir, 'cache'),
                            code_version(REPO), settings_of(args))
    except ValueError as err:
        raise UserError(err) from None
    if args.generate_data:
        ensure_toy_coco(args.data_root, ToyCocoSpec(num_val=args.val_images))
    elif not osp.isdir(args.data_root):
        raise UserError(f'--data-root {args.data_root} does not exist')
    rows = {t: [None] * args.seeds for t in args.trainings}
    stats = {t: [None] * args.seeds for t in args.trainings}
    for seed in range(args.seeds):  # seed-major: an interrupted run has
        for training in args.trainings:  # every training at its first seeds
            rows[training][seed], stats[training][seed] = evaluate_training(
                args, cache, training, seed, args.methods, args.bits, True)
    sweep = {}
    if args.sweep:
        points = [f'cd@{s:g}' for s in args.cd_strengths] + [
            f'tweo@{w:g}' for w in args.tweo_weights]
        for point in points:
            training = canonical(point)
            sweep[point] = evaluate_training(args, cache, training, 0,
                                             SWEEP_METHODS, [4], False)
        # the band of the figure: the baseline's spread over all seeds
        band = [evaluate_training(args, cache, 'baseline', seed,
                                  SWEEP_METHODS, [4], False)[0]
                for seed in range(args.seeds)]
        plot_tradeoff(sweep, band, osp.join(args.work_dir, 'tradeoff.png'))
    labels = list(stats)
    seed0 = [(stats[t][0]['stats'], stats[t][0]['alignment'],
              CachedSamples(osp.join(cache.folder, 'cells',
                                     f'samples_{t}_s0.pt')))
             for t in labels]
    plot_max_activation(seed0, labels,
                        osp.join(args.work_dir, 'max_activation.png'))
    plot_alignment(seed0, labels, osp.join(args.work_dir, 'alignment.png'))
    plot_histogram(seed0, labels, osp.join(args.work_dir, 'histogram.png'))
    command = shlex.join(sys.argv[1:])
    with open(osp.join(args.work_dir, 'results.json'), 'w') as f:
        json.dump(dict(args=vars(args), version=code_version(REPO),
                       command=command,
                       metrics=rows, outliers=stats,
                       sweep={k: dict(metrics=v[0], outliers=v[1])
                              for k, v in sweep.items()}), f, indent=2)
    table = markdown(
        args, rows, stats, sweep,
        f'`python tools/analysis/experiment.py {command}`'
        f' (this invocation, {(time.time() - start) / 60:.0f} min; cached '
        'cells are not re-run)')
    with open(osp.join(args.work_dir, 'results.md'), 'w') as f:
        f.write(table)
    print('\n' + table)
    print(f'wrote {args.work_dir}/results.md, results.json and plots')


if __name__ == '__main__':
    run_main(main)
