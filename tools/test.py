"""Evaluate a checkpoint; MMDetection's ``tools/test.py`` command line.

The metrics are also written to ``WORK_DIR/test_metrics.json``.

Bad configs, data paths and checkpoints end in one line saying what to do.
"""
import argparse
import json
import os.path as osp

import _bootstrap  # noqa: F401  (must precede OpenMMLab imports)
from mmengine.config import DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import mmcd  # noqa: F401  (registers mmcd's modules)
from mmcd.core.quant import QUANT_METHODS
from mmcd.utils.runner_setup import (UserError, add_profile_argument,
                                     add_quant_hook,
                                     add_quantized_checkpoint_hook,
                                     check_checkpoint, check_datasets,
                                     default_work_dir, load_config, run_main,
                                     set_local_rank_env, setup_launcher,
                                     warn_if_oversubscribed)


def parse_args():
    parser = argparse.ArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir',
                        help='the dir to save the evaluation metrics')
    parser.add_argument('--out', help='dump predictions to this .pkl file')
    parser.add_argument(
        '--quant', metavar='wNaM',
        help='post-training quantization before evaluation, e.g. w4a4 '
        '(adds a PostTrainingQuantHook)')
    parser.add_argument('--quant-method', default='repq-vit',
                        help='a registered PTQ method (built in: '
                        f'{", ".join(QUANT_METHODS.names())}; the config\'s '
                        'custom_imports may register more)')
    add_profile_argument(parser, '--quant-profile')
    parser.add_argument(
        '--layer-bits', nargs='+', default=(), metavar='REGEX=wNaM',
        help='with --quant: mixed precision, e.g. "stages\\.3=w8a8" '
        '"patch_embed=a8" (the first pattern matching a layer name wins)')
    parser.add_argument(
        '--quant-checkpoint', metavar='FILE',
        help='evaluate the quantized model saved by tools/quantize.py '
        '(its settings come from the file; not with --quant)')
    parser.add_argument('--calib-images', type=int,
                        help='calibration images (default 32)')
    parser.add_argument('--compare-fp', action='store_true',
                        help='with --quant: also evaluate the float model '
                        'and print both')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value')
    parser.add_argument('--launcher', default='none',
                        choices=['none', 'pytorch', 'slurm', 'mpi'],
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    set_local_rank_env(args.local_rank)
    cfg = load_config(args.config, args.cfg_options)
    cfg.work_dir = default_work_dir(cfg, args.config, args.work_dir)
    check_checkpoint(args.checkpoint)
    cfg.load_from = args.checkpoint
    if args.quant and args.quant_checkpoint:
        raise UserError('--quant calibrates, --quant-checkpoint loads a '
                        'calibrated model: give one of them')
    if args.quant_checkpoint:
        if args.layer_bits or args.calib_images is not None or \
                args.quant_profile:
            raise UserError('--layer-bits, --calib-images and '
                            '--quant-profile are settings of the quantized '
                            'checkpoint (tools/quantize.py), not of '
                            '--quant-checkpoint')
        add_quantized_checkpoint_hook(cfg, args.quant_checkpoint,
                                      args.compare_fp)
    elif args.quant:
        add_quant_hook(cfg, args.quant, args.quant_method, args.compare_fp,
                       args.calib_images, args.layer_bits,
                       args.quant_profile)
    elif args.layer_bits:
        raise UserError('--layer-bits needs --quant')
    elif args.quant_profile:
        raise UserError('--quant-profile needs --quant')
    check_datasets(cfg, ['test_dataloader'])
    warn_if_oversubscribed()
    setup_launcher(cfg, args.launcher)
    runner = (Runner.from_cfg(cfg) if 'runner_type' not in cfg else
              RUNNERS.build(cfg))
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise UserError('--out must be a .pkl or .pickle file')
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out))
    metrics = runner.test()
    if runner.rank == 0:
        save_metrics(metrics, runner)


def save_metrics(metrics, runner):
    """Write the metrics as JSON in the work dir (latest run) and in the
    run's log dir, so scripts can collect them."""
    for folder in (runner.work_dir, runner.log_dir):
        with open(osp.join(folder, 'test_metrics.json'), 'w') as f:
            json.dump(dict(config=runner.cfg.filename,
                           checkpoint=runner.cfg.load_from,
                           metrics={k: float(v) for k, v in metrics.items()}),
                      f, indent=2)


if __name__ == '__main__':
    run_main(main)
