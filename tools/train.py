"""Train a detector; MMDetection's ``tools/train.py`` command line.

Differences: ``--amp`` keeps custom optim wrappers (their AMP variant),
``--resume`` is bit-exact (:class:`mmcd.engine.hooks.RNGStateHook` is added),
CPU runs under torchrun use gloo, and bad configs, data paths and checkpoints
end in one line saying what to do.
"""
import argparse

import _bootstrap  # noqa: F401  (must precede OpenMMLab imports)
from mmengine.config import DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import mmcd  # noqa: F401  (registers mmcd's modules)
from mmcd.utils.runner_setup import (UserError,
                                      add_rng_state_hook, check_checkpoint,
                                      check_datasets,
                                      default_work_dir, enable_amp,
                                      load_config, resume_latest, run_main,
                                      set_local_rank_env, setup_launcher,
                                      warn_if_oversubscribed)


def parse_args():
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision (the AMP variant of '
                        'the configured optim wrapper)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by the actual batch size')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from this checkpoint, or without a value from the '
        'latest checkpoint in the work dir (none yet: start as the config '
        'says, from its load_from if any)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (e.g. '
        'train_cfg.max_epochs=2)')
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
    if args.amp:
        enable_amp(cfg)
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise UserError(
                '--auto-scale-lr needs auto_scale_lr.base_batch_size in the '
                'config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        resume_latest(cfg)
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    if cfg.get('load_from'):
        check_checkpoint(cfg.load_from, '--resume checkpoint' if cfg.get(
            'resume') else 'load_from checkpoint')
    check_datasets(cfg, ['train_dataloader', 'val_dataloader'])
    warn_if_oversubscribed()
    add_rng_state_hook(cfg)
    setup_launcher(cfg, args.launcher)
    runner = (Runner.from_cfg(cfg) if 'runner_type' not in cfg else
              RUNNERS.build(cfg))
    runner.train()


if __name__ == '__main__':
    run_main(main)
