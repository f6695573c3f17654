"""Quantize a trained detector once and save it: calibration, then block
reconstruction if asked for, written to a quantized checkpoint that
``tools/test.py --quant-checkpoint`` evaluates without calibrating again.

The settings are the config's ``PostTrainingQuantHook`` (or ``--quant``,
``--quant-method``, ``--quant-profile``, ``--layer-bits``,
``--calib-images`` as in ``tools/test.py``; ``--reconstruction
iters=20000 batch_size=1 ...`` adds or overrides reconstruction;
``--quant-method qdrop`` or ``aphq-vit`` bring their own). APHQ-ViT's MLP
reconstruction, if asked for, runs before calibration and is saved with
it. The file is written after calibration
and after every reconstruction unit; run the same command again after an
interruption and it continues with the next unit. The float checkpoint is
not touched.

    python tools/quantize.py CONFIG CHECKPOINT --out quantized.pth
        [--quant w4a4] [--quant-method repq-vit] [--reconstruction iters=..]
"""
import argparse
import copy
import os
import os.path as osp

import _bootstrap  # noqa: F401  (before torch: tools/_bootstrap.py)
from mmengine.config import DictAction
from mmengine.logging import print_log
from mmengine.runner import Runner

from mmcd.utils.runner_setup import (UserError, add_profile_argument,
                                     add_quant_hook, check_checkpoint,
                                     check_datasets, load_config, run_main)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint', help='the float checkpoint')
    parser.add_argument('--out', required=True,
                        help='the quantized checkpoint to write (or finish)')
    parser.add_argument('--quant', metavar='wNaM')
    parser.add_argument('--quant-method', default='repq-vit')
    add_profile_argument(parser, '--quant-profile')
    parser.add_argument('--layer-bits', nargs='+', default=(),
                        metavar='REGEX=wNaM')
    parser.add_argument('--calib-images', type=int)
    parser.add_argument('--reconstruction', nargs='+', action=DictAction,
                        help='reconstruction options, key=value (e.g. '
                        'iters=20000 batch_size=1)')
    parser.add_argument('--work-dir')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args()


def ptq_hook(cfg, args) -> dict:
    """The PTQ hook settings: ``--quant`` ones, else the config's hook."""
    if args.quant:
        add_quant_hook(cfg, args.quant, args.quant_method, False,
                       args.calib_images, args.layer_bits,
                       args.quant_profile)
    hooks = [h for h in cfg.get('custom_hooks', [])
             if h.get('type') == 'PostTrainingQuantHook']
    if not hooks:
        raise UserError(f'{args.config} has no PostTrainingQuantHook: give '
                        '--quant wNaM (and --quant-method)')
    hook = dict(hooks[-1])
    if args.calib_images is not None:
        hook['calib'] = dict(hook.get('calib') or {},
                             num_images=args.calib_images)
    if args.layer_bits and not args.quant:
        raise UserError('--layer-bits goes with --quant (or set layer_bits '
                        "in the config's PostTrainingQuantHook)")
    if args.quant_profile and not args.quant:
        raise UserError('--quant-profile goes with --quant (or set profile '
                        "in the config's PostTrainingQuantHook)")
    if args.reconstruction:
        hook['reconstruction'] = dict(hook.get('reconstruction') or {},
                                      **args.reconstruction)
    return hook


def main():
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options)
    check_checkpoint(args.checkpoint)
    hook = ptq_hook(cfg, args)
    from mmcd.core.quant import quantize_model
    from mmcd.core.quant.saved_state import restore_quantized
    from mmcd.engine.calibration import (calibrated_copy,
                                         check_reconstruction, model_units,
                                         reconstruct_on)
    from mmcd.engine.hooks import PostTrainingQuantHook
    from mmcd.engine.quantized_checkpoint import (check_meta, describe,
                                                  load_quantized, make_meta,
                                                  save_quantized)
    try:
        settings = PostTrainingQuantHook(
            **{k: v for k, v in hook.items() if k != 'type'})
    except ValueError as err:
        raise UserError(f'PostTrainingQuantHook: {err}') from None
    quant_cfg, calib = settings.quant_cfg, settings.calib
    check_datasets(cfg, ['train_dataloader'])
    cfg.custom_hooks = [h for h in cfg.get('custom_hooks', [])
                        if h.get('type') != 'PostTrainingQuantHook']
    cfg.work_dir = args.work_dir or osp.join(
        osp.dirname(osp.abspath(args.out)), 'quantize_runner')
    cfg.load_from = None
    runner = Runner.from_cfg(cfg)
    runner.load_checkpoint(args.checkpoint, map_location='cpu')
    model = runner.model.eval()
    batch = calib.batch(cfg)
    recon_batch = calib.reconstruction_batch(cfg, quant_cfg) or batch
    recon = quant_cfg.reconstruction_config()
    if recon is not None:
        check_reconstruction(model, quant_cfg)
    units = model_units(model) if recon is not None else []
    if osp.isfile(args.out):
        meta, state = load_quantized(args.out)
        check_meta(meta, quant_cfg, cfg.model, args.out, complete=False)
        if meta['float_checkpoint'] != osp.abspath(args.checkpoint):
            raise UserError(f'{args.out} was made from '
                            f'{meta["float_checkpoint"]}, not '
                            f'{args.checkpoint}: use another --out')
        quant_model = quantize_model(copy.deepcopy(model), quant_cfg)
        restore_quantized(quant_model, state)
        print_log(f'quantize: resuming {args.out} ({describe(meta)}), '
                  f'{len(meta["units_done"])} of {len(units)} units done',
                  logger='current')
    else:
        meta = make_meta(quant_cfg, cfg.model, calib.num_images,
                         osp.abspath(args.checkpoint), units)
        quant_model = calibrated_copy(model, quant_cfg, batch, recon_batch,
                                      {})
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        save_quantized(args.out, quant_model, meta)
    left = [u for u in units if u not in meta['units_done']]

    def after_unit(name, stats):
        meta['units_done'].append(name)
        save_quantized(args.out, quant_model, meta)

    if left:
        try:
            reconstruct_on(quant_model, model, quant_cfg, recon_batch, left,
                           after_unit)
        except FloatingPointError as err:
            raise UserError(f'{err}; the {len(meta["units_done"])} units '
                            f'done are saved in {args.out}') from None
    print_log(f'quantize: {args.out} complete ({describe(meta)}); evaluate '
              f'with tools/test.py {args.config} {args.checkpoint} '
              f'--quant-checkpoint {args.out}', logger='current')


if __name__ == '__main__':
    run_main(main)
