"""What ``tools/train.py`` and ``tools/test.py`` do before MMEngine's Runner
takes over: config loading with clear errors, dataset pre-flight checks,
``--amp`` that keeps custom optim wrappers, the RNG-state hook that makes
``--resume`` bit-exact, and CPU (gloo) distributed
set-up, which MMEngine 0.10.7's ``init_dist`` cannot do (it calls
``torch.cuda.set_device`` whatever the backend).
"""
import json
import logging
import os
import os.path as osp
import re
import sys
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.registry import LOOPS
from mmengine.runner import EpochBasedTrainLoop

from mmcd.compat import CheckpointLoadError
from mmcd.compat.torch_checkpoint import load_from_local_weights_only
from mmcd.core import ConfigError


class UserError(Exception):
    """A bad config, path or argument; tools print it as one line."""


#: Errors a command-line tool reports as one line instead of a traceback (a
#: missing file included, also when a dataloader worker hit it).
USER_ERRORS = (UserError, CheckpointLoadError, ConfigError,
               FileNotFoundError, FloatingPointError)


def error_line(err: BaseException) -> str:
    """``error: ...`` in one line. An error re-raised from a dataloader
    worker carries the worker's traceback in its message: its last line is
    the error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith('Caught '):
        return f'error: {lines[-1]}'
    return f'error: {" ".join(lines) or type(err).__name__}'


def run_main(main: Callable[[], Optional[int]]) -> None:
    """Run a tool's ``main`` and exit with its return value; the errors of
    :data:`USER_ERRORS` end it with one line and exit status 1."""
    try:
        code = main()
    except USER_ERRORS as err:
        sys.exit(error_line(err))
    sys.exit(code)


def check_checkpoint(path: str, what: str = 'checkpoint') -> None:
    """Fail now, in one line, on a missing or unreadable checkpoint (before
    the Runner prints the config and builds the model). The pickle is read
    and checked; the tensors are only memory-mapped, not read, since the
    Runner loads the file again."""
    if '://' in path:
        return
    if not osp.isfile(path):
        raise UserError(f'{what} {path} does not exist')
    load_from_local_weights_only(path, map_location='cpu', mmap=True)


def warn_if_oversubscribed() -> None:
    """Warn when other processes already keep the machine's cores busy
    (1-minute load average >= cores) and ``OMP_NUM_THREADS`` is unset:
    PyTorch starts one thread per core, and jobs whose threads preempt each
    other slow down many times over."""
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    if load >= cores and 'OMP_NUM_THREADS' not in os.environ:
        print_log(f'the machine is busy (load {load:.1f} on {cores} cores): '
                  'PyTorch\'s threads will compete with the other jobs; set '
                  'OMP_NUM_THREADS=1 (or fewer threads than free cores)',
                  logger='current', level=logging.WARNING)


#: ``--amp`` replaces these optim wrapper types by their AMP variant. AMP
#: types map to themselves so that ``--amp`` on an AMP config is harmless.
AMP_VARIANTS = {
    'OptimWrapper': 'AmpOptimWrapper',
    'AmpOptimWrapper': 'AmpOptimWrapper',
    'ColinearityDecayOptimWrapper': 'ColinearityDecayAmpOptimWrapper',
    'ColinearityDecayAmpOptimWrapper': 'ColinearityDecayAmpOptimWrapper',
}


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """``Config.fromfile`` (which imports the file's ``custom_imports``)
    plus ``--cfg-options`` (whose ``custom_imports`` are imported too), so
    that what a user registers there is known to the tool; a missing file
    fails with a message instead of a traceback."""
    if not osp.isfile(path):
        raise UserError(f'config {path} does not exist (configs live under '
                        'configs/, e.g. configs/toy/)')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
        # given whole or by a dotted key (custom_imports.imports=[...])
        if any(key.split('.')[0] == 'custom_imports' for key in cfg_options):
            from mmengine.utils import import_modules_from_strings
            import_modules_from_strings(**cfg.custom_imports)
    return cfg


def resume_latest(cfg: Config) -> None:
    """``--resume`` without a path: continue from the work dir's last
    checkpoint when it has one; otherwise start as the config says, from
    its ``load_from`` if any (MMEngine's own ``resume=True`` drops
    ``load_from`` when it finds no checkpoint, and a fine-tuning run
    interrupted before its first checkpoint would restart from random
    weights)."""
    from mmengine.runner import find_latest_checkpoint
    latest = find_latest_checkpoint(cfg.work_dir)
    if latest is not None:
        cfg.resume, cfg.load_from = True, latest
        return
    cfg.resume = False
    print_log(f'--resume: no checkpoint in {cfg.work_dir} yet; starting '
              + (f'from load_from {cfg.load_from}' if cfg.get('load_from')
                 else 'from the initial weights'), logger='current')


def default_work_dir(cfg: Config, config_path: str,
                     work_dir: Optional[str]) -> str:
    """CLI ``--work-dir`` > ``work_dir`` in the file > ``work_dirs/NAME``."""
    if work_dir is not None:
        return work_dir
    if cfg.get('work_dir') is not None:
        return cfg.work_dir
    return osp.join('work_dirs', osp.splitext(osp.basename(config_path))[0])


def _leaf_datasets(dataset: dict):
    """The dataset configs under wrappers (RepeatDataset, ConcatDataset)."""
    if 'dataset' in dataset:  # RepeatDataset, ClassBalancedDataset, ...
        yield from _leaf_datasets(dataset['dataset'])
        return
    if 'datasets' in dataset:  # ConcatDataset
        for sub in dataset['datasets']:
            yield from _leaf_datasets(sub)
        return
    yield dataset


def _join_root(dataset: dict, path: str) -> str:
    root = dataset.get('data_root') or ''
    return path if osp.isabs(path) else osp.join(root, path)


def _dataset_files(dataset: dict):
    """(ann_file, image folder) of a dataset config, through wrappers."""
    for leaf in _leaf_datasets(dataset):
        if leaf.get('ann_file'):
            yield _join_root(leaf, leaf['ann_file']), 'annotation file'
        img = (leaf.get('data_prefix') or {}).get('img')
        if img is not None:
            yield _join_root(leaf, img), 'image folder'


def check_datasets(cfg: Config, loaders: Iterable[str]) -> None:
    """Fail early, in one line, when a dataloader's files are missing; warn
    once per COCO annotation file of the annotations mmdet will drop (on
    rank 0 only: counting reads the file once more, which for COCO's train
    annotations costs seconds per process)."""
    warned = set()
    count_dropped = os.environ.get('RANK', '0') == '0'  # set by torchrun
    for loader in loaders:
        dataset = (cfg.get(loader) or {}).get('dataset')
        if dataset is None:
            continue
        for path, what in _dataset_files(dataset):
            if '://' in path or osp.exists(path):
                continue
            root = next((leaf['data_root'] for leaf in _leaf_datasets(
                dataset) if leaf.get('data_root')), 'data/toy_coco/')
            raise UserError(
                f'{what} {path} of {loader} does not exist. Generate the toy '
                f'set with `python tools/misc/make_toy_coco.py {root}` (with '
                "the options in the config's header, if any), or point "
                'data_root at your COCO copy, e.g. --cfg-options '
                f'{loader}.dataset.data_root=/path/to/coco/')
        for leaf in _leaf_datasets(dataset):
            ann = _join_root(leaf, leaf.get('ann_file') or '')
            kind = _coco_dataset_class(leaf)
            if (count_dropped and ann not in warned and kind
                    and ann.endswith('.json') and '://' not in ann):
                warned.add(ann)
                classes = (leaf.get('metainfo') or {}).get(
                    'classes') or kind.METAINFO['classes']
                _warn_dropped_annotations(ann, classes, loader)


def _coco_dataset_class(dataset: dict):
    """The dataset's class when it is mmdet's CocoDataset or a subclass."""
    kind = dataset.get('type')
    kind = DATASETS.get(kind) if isinstance(kind, str) else kind
    if isinstance(kind, type) and issubclass(kind, CocoDataset):
        return kind
    return None


def dropped_annotations(coco: dict, classes: Sequence[str]):
    """The annotations of a COCO dict that mmdet 3's ``CocoDataset`` drops
    (``parse_data_info``, in its order): ``{reason: [annotation, ...]}``.
    ``classes``: the dataset's class names."""
    images = {img['id']: img for img in coco.get('images', [])}
    names = {cat['id']: cat['name'] for cat in coco.get('categories', [])}
    dropped = {}
    for ann in coco.get('annotations', []):
        img = images.get(ann.get('image_id'))
        if img is None:
            continue  # mmdet never reads it
        x1, y1, w, h = ann['bbox']
        inter_w = max(0, min(x1 + w, img['width']) - max(x1, 0))
        inter_h = max(0, min(y1 + h, img['height']) - max(y1, 0))
        if inter_w * inter_h == 0:
            reason = ('box without area inside the image (outside it, or '
                      'width or height <= 0)')
        elif ann.get('area', 0) <= 0 or w < 1 or h < 1:
            reason = 'width or height < 1 or area <= 0'
        elif names.get(ann['category_id']) not in classes:
            reason = 'category not among the classes'
        else:
            continue
        dropped.setdefault(reason, []).append(ann)
    return dropped


def _warn_dropped_annotations(ann_file: str, classes: Sequence[str],
                              loader: str) -> None:
    with open(ann_file) as f:
        coco = json.load(f)
    dropped = dropped_annotations(coco, classes)
    if not dropped:
        return
    total = sum(map(len, dropped.values()))
    reasons = '; '.join(
        f'{len(anns)}: {reason} (e.g. id {anns[0].get("id")}, bbox '
        f'{anns[0]["bbox"]})' for reason, anns in dropped.items())
    print_log(f'{loader}: {total} of {len(coco["annotations"])} annotations '
              f'of {ann_file} are dropped by mmdet\'s CocoDataset: '
              f'{reasons}', logger='current', level=logging.WARNING)


def enable_amp(cfg: Config) -> None:
    """Switch the optim wrapper to its AMP variant, keeping custom types
    (mmdet's train.py would overwrite them with ``AmpOptimWrapper``)."""
    wrapper_type = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper_type not in AMP_VARIANTS:
        raise UserError(
            f'--amp: optim wrapper {wrapper_type} has no known AMP variant '
            f'(known: {", ".join(sorted(AMP_VARIANTS))}); set an AMP optim '
            'wrapper in the config instead')
    cfg.optim_wrapper.type = AMP_VARIANTS[wrapper_type]
    cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')


def setup_launcher(cfg: Config, launcher: str) -> None:
    """Set ``cfg.launcher``; on a machine without CUDA, start a gloo process
    group ourselves and make DDP wrap the model without ``device_ids``."""
    cfg.launcher = launcher
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher != 'pytorch':
        raise UserError(f'--launcher {launcher} needs CUDA; on CPU use '
                        '--launcher pytorch under torchrun')
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    cfg.env_cfg.setdefault('dist_cfg', {})['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper['device_ids'] = None  # CPU modules take no device ids
    cfg.model_wrapper_cfg = wrapper


def _epoch_based(train_cfg: dict) -> bool:
    """Whether MMEngine builds an epoch-based loop from ``train_cfg``
    (``type``, or ``by_epoch`` as ``Runner.build_train_loop`` reads it)."""
    if 'type' not in train_cfg:
        return bool(train_cfg.get('by_epoch', True))
    loop = train_cfg['type']
    if isinstance(loop, str):
        loop = LOOPS.get(loop)
    return isinstance(loop, type) and issubclass(loop, EpochBasedTrainLoop)


def add_rng_state_hook(cfg: Config) -> None:
    """Give every training run :class:`~mmcd.engine.hooks.RNGStateHook`
    (bit-exact ``--resume``) unless the config lists it already, and turn
    the train loader's persistent workers off in epoch-based training: the
    hook re-seeds workers at each epoch start, which persistent workers
    would skip (the hook's module docstring says why)."""
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(h.get('type') in ('RNGStateHook', 'mmcd.RNGStateHook')
               for h in hooks):
        cfg.custom_hooks = hooks + [dict(type='RNGStateHook')]
    loader = cfg.get('train_dataloader') or {}
    if (loader.get('num_workers') and loader.get('persistent_workers')
            and _epoch_based(cfg.get('train_cfg') or {})):
        loader['persistent_workers'] = False
        print_log('train_dataloader.persistent_workers set to False: '
                  'RNGStateHook re-seeds the workers every epoch for a '
                  'bit-exact --resume', logger='current')


def set_local_rank_env(local_rank: int) -> None:
    """``torch.distributed.launch`` passes ``--local-rank``; torchrun sets
    the variable. MMEngine reads the variable."""
    os.environ.setdefault('LOCAL_RANK', str(local_rank))


def parse_quant_spec(spec: str):
    """``'w4a4'`` -> ``(4, 4)``."""
    match = re.fullmatch(r'w(\d+)a(\d+)', spec.lower())
    if match is None:
        raise UserError(f'--quant takes wNaM, e.g. w4a4 or w6a6, got {spec}')
    return int(match.group(1)), int(match.group(2))


def parse_layer_bits(specs: Sequence[str]) -> list:
    """``['REGEX=w8a8', 'REGEX=a8']`` -> ``layer_bits`` rules."""
    rules = []
    for spec in specs:
        pattern, _, bits = spec.rpartition('=')
        match = re.fullmatch(r'(?:w(\d+))?(?:a(\d+))?', bits.lower())
        if not pattern or match is None or not bits:
            raise UserError('--layer-bits takes REGEX=wNaM (or REGEX=wN, '
                            f'REGEX=aM), e.g. "stages\\.3=w8a8", got {spec!r}')
        rule = dict(pattern=pattern)
        for key, value in zip(('w_bits', 'a_bits'), match.groups()):
            if value is not None:
                rule[key] = int(value)
        rules.append(rule)
    return rules


def add_quant_hook(cfg: Config, spec: str, method: str, compare_fp: bool,
                   calib_images: Optional[int],
                   layer_bits: Sequence[str] = (),
                   profile: Optional[str] = None) -> None:
    """Append a PostTrainingQuantHook for ``--quant`` (replacing one the
    config already has); ``layer_bits`` as ``--layer-bits`` gives it,
    ``profile`` as ``--quant-profile`` (None: the default)."""
    from mmcd.core.quant import DEFAULT_PROFILE
    w_bits, a_bits = parse_quant_spec(spec)
    hooks = [h for h in cfg.get('custom_hooks', [])
             if h.get('type') != 'PostTrainingQuantHook']
    hook = dict(type='PostTrainingQuantHook', w_bits=w_bits, a_bits=a_bits,
                method=method, compare_fp=compare_fp,
                profile=profile or DEFAULT_PROFILE)
    if calib_images is not None:
        hook['calib'] = dict(num_images=calib_images)
    if layer_bits:
        hook['layer_bits'] = parse_layer_bits(layer_bits)
    try:  # bad bits or method: fail here, in one line
        from mmcd.engine.hooks import PostTrainingQuantHook
        PostTrainingQuantHook(**{k: v for k, v in hook.items()
                                 if k != 'type'})
    except ValueError as err:
        raise UserError(f'--quant: {err}') from None
    cfg.custom_hooks = hooks + [hook]


def add_quantized_checkpoint_hook(cfg: Config, path: str,
                                  compare_fp: bool) -> None:
    """``tools/test.py --quant-checkpoint``: a ``PostTrainingQuantHook``
    with the settings the file was made with, loading it instead of
    calibrating (it replaces the config's PTQ hook)."""
    from mmcd.engine.quantized_checkpoint import load_quantized
    meta, _ = load_quantized(path)
    hooks = [h for h in cfg.get('custom_hooks', [])
             if h.get('type') != 'PostTrainingQuantHook']
    cfg.custom_hooks = hooks + [dict(
        type='PostTrainingQuantHook', **meta['settings'],
        calib=dict(num_images=meta['calib_images']), compare_fp=compare_fp,
        quantized_checkpoint=path)]


def toy_run_config(cfg: Config, work_dir: str, data_root: str,
                   epochs: int) -> Config:
    """``cfg`` (a toy config) set up for an analysis run in ``work_dir``:
    ``epochs`` epochs with the lr drops kept at 3/4 and 11/12 of them (one
    drop for a run too short for two), one checkpoint at the end, no
    visualization hook, the toy set at ``data_root``, loaders without
    worker processes. Changes ``cfg`` in place and returns it."""
    cfg.work_dir = work_dir
    cfg.train_cfg.max_epochs = cfg.train_cfg.val_interval = epochs
    for scheduler in cfg.param_scheduler:
        if scheduler.type == 'MultiStepLR':
            scheduler.end = epochs
            scheduler.milestones = sorted({max(1, epochs * 3 // 4),
                                           max(1, epochs * 11 // 12)})
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook',
                                        interval=epochs)
    cfg.default_hooks.pop('visualization', None)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = data_root
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator].ann_file = data_root + 'annotations/instances_val.json'
    return cfg


def add_ptq_arguments(parser, calib_images: int, out_dir: str) -> None:
    """The arguments shared by the PTQ tools (sensitivity, debug, export):
    ``config checkpoint (--quant wNaM [--method] [--calib-images] |
    --quant-checkpoint FILE) [--out-dir] [--cfg-options]``."""
    from mmengine.config import DictAction

    from mmcd.core.quant import QUANT_METHODS
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--quant', metavar='wNaM')
    parser.add_argument('--method',
                        help='a registered PTQ method (default repq-vit; '
                        f'built in: {", ".join(QUANT_METHODS.names())}; the '
                        "config's custom_imports may register more)")
    parser.add_argument('--calib-images', type=int,
                        help=f'default {calib_images}')
    add_profile_argument(parser, '--profile')
    parser.add_argument('--quant-checkpoint', metavar='FILE',
                        help='a model quantized by tools/quantize.py, loaded '
                        'instead of calibrating (its settings are the run\'s)')
    parser.set_defaults(default_calib_images=calib_images)
    parser.add_argument('--out-dir', default=out_dir)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')


def add_scope_argument(parser, what: str) -> None:
    """``--scope features|detector`` of the export tools; ``what``: what
    the scope decides in the tool (the start of its help)."""
    parser.add_argument('--scope', choices=('features', 'detector'),
                        default='features',
                        help=f'{what}: backbone + neck (features, the '
                        'default; the heads stay in float PyTorch) or the '
                        'whole detector, image in, detections out, through '
                        'mmdeploy (two-stage detectors)')


def add_profile_argument(parser, flag: str) -> None:
    """``--profile`` / ``--quant-profile``: the runtime the model is
    quantized for (a registered deployment profile)."""
    from mmcd.core.quant import DEPLOY_PROFILES
    parser.add_argument(flag, metavar='PROFILE',
                        help='the runtime the model is quantized for: '
                        f'{", ".join(DEPLOY_PROFILES.names())} (default '
                        'onnxruntime, the method as published; '
                        'onnxruntime-integer: every quantizer with an '
                        'integer form; tensorrt: symmetric INT8, zero point '
                        '0, uniform post-softmax, residual additions\' '
                        'inputs quantized, 8 bits only)')


def ptq_config(args, **options):
    """The :class:`~mmcd.core.quant.QuantConfig` of the PTQ tools'
    ``--quant`` and ``--method`` (plus ``options``), or the settings of
    ``--quant-checkpoint`` (then also written to ``args.quant``,
    ``args.method`` and ``args.calib_images``, which the tools report),
    after checking that ``args.checkpoint`` exists; bad values raise
    :class:`UserError`."""
    from mmcd.core.quant import DEFAULT_PROFILE, QuantConfig
    check_checkpoint(args.checkpoint)
    load_config(args.config, args.cfg_options)  # its custom_imports
    if args.quant_checkpoint:
        return _checkpoint_settings(args, options)
    if not args.quant:
        raise UserError('give --quant wNaM (and --method) to calibrate, or '
                        '--quant-checkpoint FILE (tools/quantize.py)')
    w_bits, a_bits = parse_quant_spec(args.quant)
    args.method = args.method or 'repq-vit'
    args.profile = args.profile or DEFAULT_PROFILE
    if args.calib_images is None:
        args.calib_images = args.default_calib_images
    try:
        return QuantConfig(w_bits, a_bits, args.method, profile=args.profile,
                           **options)
    except ValueError as err:
        raise UserError(err) from None


def _checkpoint_settings(args, options):
    """``ptq_config`` for ``--quant-checkpoint``: the file's settings;
    ``--quant``, ``--method``, ``--calib-images`` and tool options that set
    them are refused (they are the file's)."""
    from mmcd.engine.quantized_checkpoint import (SETTING_DEFAULTS,
                                                  load_quantized)
    from mmcd.core.quant import QuantConfig
    given = [flag for flag, value in (
        ('--quant', args.quant), ('--method', args.method),
        ('--calib-images', args.calib_images), ('--profile', args.profile))
        if value is not None]
    given += [f'--{key.replace("_", "-")}' for key, value in options.items()
              if value]
    if given:
        raise UserError(f'{", ".join(given)}: settings of the quantized '
                        'checkpoint (tools/quantize.py), not of '
                        '--quant-checkpoint')
    meta, _ = load_quantized(args.quant_checkpoint)
    settings = meta['settings']
    args.quant = f'w{settings["w_bits"]}a{settings["a_bits"]}'
    args.method, args.calib_images = settings['method'], meta['calib_images']
    args.profile = settings.get('profile', SETTING_DEFAULTS['profile'])
    return QuantConfig(**settings)


def calibrated_from_checkpoint(args, quant_cfg,
                               loaders: Sequence[str] = ()):
    """For the PTQ tools: a Runner of ``args.config`` (work dir under
    ``args.out_dir``) with ``args.checkpoint`` loaded, and a copy of its
    model quantized with ``quant_cfg`` and calibrated on
    ``args.calib_images`` images (or loaded from ``--quant-checkpoint``;
    ``quant_cfg`` None: no quantized model, None in its place).
    Returns ``(runner, quantized model, calibration batch)``; ``loaders``:
    dataloaders checked besides the train one (the calibration images'
    source)."""
    from mmengine.runner import Runner

    from mmcd.engine.calibration import CalibrationOptions, quantize_copy
    from mmcd.engine.quantized_checkpoint import load_quantized_model
    cfg = load_config(args.config, args.cfg_options)
    check_datasets(cfg, ['train_dataloader', *loaders])
    os.makedirs(args.out_dir, exist_ok=True)
    cfg.work_dir, cfg.load_from = osp.join(args.out_dir, 'runner'), None
    runner = Runner.from_cfg(cfg)
    runner.load_checkpoint(args.checkpoint, map_location='cpu')
    runner.model.eval()
    batch = CalibrationOptions(num_images=args.calib_images).batch(cfg)
    if quant_cfg is None:
        return runner, None, batch
    if args.quant_checkpoint:
        return runner, load_quantized_model(
            runner.model, quant_cfg, cfg.model, args.quant_checkpoint,
            args.checkpoint), batch
    return runner, quantize_copy(runner.model, quant_cfg, batch), batch
