"""Calibration and evaluation helpers shared by the quantization hooks and
the analysis tools: which images calibrate (:class:`CalibrationOptions`,
:func:`calibration_loader`), calibrating a converted model on them
(:func:`calibrate_on`, :func:`quantize_copy`; the images are loaded once, as
one batch, and passed around), and running a model over a
loader (:func:`run_test_steps`, :func:`evaluate`), with progress bars and
the summary in MMEngine's log."""
import copy
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from mmengine.logging import print_log
from mmengine.runner import Runner, ValLoop
from mmengine.utils import ProgressBar

from mmcd.core import ConfigError
from mmcd.core.architectures import reconstruction_patterns
from mmcd.core.quant import (QuantConfig, QuantMatMul, calibrate,
                             quantize_model)
from mmcd.core.quant.mlp_reconstruction import find_mlps, reconstruct_mlps
from mmcd.core.quant.reconstruction import (needs_task_loss, reconstruct,
                                            reconstruction_units)
from .task_objective import require_rpn, rpn_objective


@dataclass
class CalibrationOptions:
    """The ``calib`` option of the quantization hooks: ``num_images`` (32),
    ``dataloader`` (a dataloader config; default: the train set with the
    test pipeline, see :func:`calibration_loader`), ``seed`` (0)."""
    num_images: int = 32
    dataloader: Optional[Dict] = None
    seed: int = 0

    @classmethod
    def from_dict(cls, calib: Optional[Dict]) -> 'CalibrationOptions':
        calib = dict(calib or {})
        unknown = set(calib) - {'num_images', 'dataloader', 'seed'}
        if unknown:
            raise ConfigError(f'calib: unknown option(s) {sorted(unknown)}')
        options = cls(**calib)
        options.num_images = int(options.num_images)
        if options.num_images < 1:
            raise ConfigError('calib.num_images must be >= 1, got '
                              f'{options.num_images}')
        return options

    def batch(self, cfg, num_images: Optional[int] = None) -> Dict:
        """The calibration set as one batch (a ``data_batch`` dict of the
        :func:`calibration_loader`), loaded once per calibration;
        ``num_images`` overrides the count (reconstruction images)."""
        return next(iter(calibration_loader(
            cfg, num_images or self.num_images, self.seed, self.dataloader)))

    def reconstruction_batch(self, cfg, quant_cfg: QuantConfig
                             ) -> Optional[Dict]:
        """The images reconstruction runs on when its ``num_images`` asks
        for other ones than the calibration images (else None)."""
        recon = quant_cfg.reconstruction_config()
        if recon is None or recon.num_images is None:
            return None
        return self.batch(cfg, recon.num_images)


def calibration_loader(cfg, num_images: int, seed: int = 0,
                       loader_cfg: Optional[Dict] = None):
    """Dataloader of calibration images: ``loader_cfg``, or by default the
    train dataloader of ``cfg`` with the test pipeline (no augmentation),
    shuffled with ``seed``, the same images on every rank of a distributed
    run; its batch size is ``num_images`` (the calibration set is its first
    batch, see :func:`mmcd.core.quant.calibrate`). Fails when it has fewer
    than ``num_images`` images."""
    if loader_cfg is None:
        loader_cfg = copy.deepcopy(cfg.train_dataloader)
        loader_cfg['dataset']['pipeline'] = copy.deepcopy(
            cfg.test_dataloader['dataset']['pipeline'])
        loader_cfg.update(num_workers=0, persistent_workers=False)
        loader_cfg['sampler'] = dict(type='SameOnAllRanksSampler', seed=seed)
        loader_cfg.pop('batch_sampler', None)
    loader_cfg = copy.deepcopy(loader_cfg)
    loader_cfg['batch_size'] = num_images
    loader = Runner.build_dataloader(loader_cfg, seed=seed)
    if len(loader.dataset) < num_images:
        filter_cfg = loader_cfg['dataset'].get('filter_cfg')
        filtered = (f' (after the dataset\'s filter_cfg={dict(filter_cfg)}'
                    ', which drops images without usable annotations)'
                    if filter_cfg else '')
        raise ConfigError(
            f'the calibration set has {len(loader.dataset)} images'
            f'{filtered}, fewer than the {num_images} asked for '
            '(calib.num_images, --calib-images)')
    return loader


def calibrate_on(model, quant_cfg, batch: Dict, what: str = 'PTQ',
                 calibrate_fn=calibrate) -> Dict:
    """Calibrate ``model`` (converted for ``quant_cfg``) on ``batch`` (all
    calibration images, one ``test_step``), and log the summary; layers the
    calibration never reached are named in a warning (they stay in
    float)."""
    handles = _matmul_search_progress(model)
    try:
        summary = calibrate_fn(model, quant_cfg,
                               lambda: model.test_step(batch))
    finally:
        for handle in handles:
            handle.remove()
    named = {key: summary.pop(key, []) for key in CALIBRATION_WARNINGS}
    print_log(f'{what}: calibrated on {len(batch["inputs"])} images: '
              f'{summary}', logger='current')
    for key, names in named.items():
        if names:
            print_log(f'{what}: {len(names)} quantizer(s) '
                      f'{CALIBRATION_WARNINGS[key]}: {", ".join(names)}',
                      logger='current', level=logging.WARNING)
    return summary


#: lists of quantizer names in a calibration summary, each logged as a
#: warning with this text (:func:`mmcd.core.quant.calibrate`)
CALIBRATION_WARNINGS = dict(
    unreached='never ran on the calibration images and stay in float',
    first_call_only='of attention matmuls called more than once per pass '
    'are calibrated on their first call only (the joint product search '
    'sees one call)',
    unsettled='of modules called more than once per pass still changed '
    'after the last extra calibration pass')


def _matmul_search_progress(model) -> List:
    """Hooks logging each joint search of an attention matmul's operands
    in the calibration pass (``QuantMethod.matmul_search``, the bulk of
    APHQ-ViT's calibration on a CPU) with the time left; their handles."""
    matmuls = {m: n for n, m in model.named_modules()
               if isinstance(m, QuantMatMul) and m.search is not None}
    if not matmuls:
        return []
    progress = _eta_logger('matmul search', len(matmuls),
                           lambda s: f'{s["seconds"]:.1f} s')
    started, done = {}, []

    def before(module, args):
        if module.searching:
            started[module] = time.monotonic()

    def after(module, args, out):
        if module in started:
            seconds = time.monotonic() - started.pop(module)
            progress(len(done), matmuls[module], dict(seconds=seconds))
            done.append(module)

    return [h for m in matmuls for h in (m.register_forward_pre_hook(before),
                                         m.register_forward_hook(after))]


@torch.no_grad()
def calibration_images(model, batch: Dict) -> torch.Tensor:
    """The calibration images of ``batch`` after the model's data
    preprocessor, ``[N, 3, H, W]``."""
    return model.data_preprocessor(batch, False)['inputs']


@torch.no_grad()
def dense_outputs(model, images: torch.Tensor) -> List[torch.Tensor]:
    """The detector's outputs that do not depend on proposals, for
    preprocessed ``images``: the neck's feature maps and, for a two-stage
    detector, the RPN's class and box logits per level (what the
    sensitivity and debug tools compare float and quantized on)."""
    features = model.extract_feat(images)
    outputs = list(features)
    if getattr(model, 'rpn_head', None) is not None:
        scores, deltas = model.rpn_head(features)
        outputs += list(scores) + list(deltas)
    return outputs


def run_test_steps(model, batches, num_batches: int) -> None:
    """``model.test_step`` on the first ``num_batches`` of ``batches``, with
    a progress bar."""
    bar = ProgressBar(num_batches)
    for i, batch in enumerate(batches):
        if i == num_batches:
            break
        model.test_step(batch)
        bar.update()
    print()  # ProgressBar leaves the cursor on its line


def quantize_copy(model, quant_cfg: QuantConfig, batch: Dict,
                  summary: Optional[Dict] = None,
                  recon_batch: Optional[Dict] = None):
    """A quantized, calibrated copy of ``model`` (which is not touched,
    :func:`calibrated_copy`), then block reconstruction when the method or
    ``quant_cfg.reconstruction`` asks for it (:func:`reconstruct_on`, on
    ``recon_batch``, default ``batch``). ``summary``, a dict, receives the
    reconstructions' per-unit stats (``mlp_reconstruction_stats``,
    ``reconstruction_stats``)."""
    recon_batch = recon_batch or batch
    summary = {} if summary is None else summary
    reconstructs = quant_cfg.reconstruction_config() is not None
    if reconstructs:
        check_reconstruction(model, quant_cfg)
    quant_model = calibrated_copy(model, quant_cfg, batch, recon_batch,
                                  summary)
    if reconstructs:
        summary['reconstruction_stats'] = reconstruct_on(
            quant_model, model, quant_cfg, recon_batch)
    return quant_model


def calibrated_copy(model, quant_cfg: QuantConfig, batch: Dict,
                    recon_batch: Dict, summary: Dict):
    """:func:`~mmcd.core.quant.quantize_model` on a copy of ``model``, MLP
    reconstruction on ``recon_batch`` when the reconstruction asks for it
    (:func:`reconstruct_mlps_on`, its stats in ``summary``), then
    :func:`~mmcd.core.quant.calibrate` on ``batch`` (all calibration
    images, e.g. :meth:`CalibrationOptions.batch`)."""
    recon = quant_cfg.reconstruction_config()
    quant_model = quantize_model(copy.deepcopy(model), quant_cfg)
    if recon is not None and recon.mlp:
        summary['mlp_reconstruction_stats'] = reconstruct_mlps_on(
            quant_model, model, quant_cfg, recon_batch)
    print_log(f'PTQ: W{quant_cfg.w_bits}A{quant_cfg.a_bits} '
              f'{quant_cfg.method}, calibrating on {len(batch["inputs"])} '
              'images', logger='current')
    calibrate_on(quant_model, quant_cfg, batch)
    return quant_model


def model_units(model) -> List[str]:
    """The reconstruction units of ``model`` (the architecture specs'
    ``reconstruction_units``), in model order; none is an error."""
    units = reconstruction_units(model, reconstruction_patterns())
    if not units:
        raise ConfigError(
            'reconstruction: no reconstruction unit in the model (the '
            'architecture specs\' reconstruction_units match none of its '
            'modules)')
    return units


def check_reconstruction(model, quant_cfg: QuantConfig) -> None:
    """Fail before any work when ``quant_cfg``'s reconstruction cannot run
    on ``model``: no unit, no MLP for MLP reconstruction, no task objective
    for a loss that needs one."""
    recon = quant_cfg.reconstruction_config()
    mlps = [name for name, _ in find_mlps(model)]
    if recon.mlp and not mlps:
        raise ConfigError(
            'reconstruction mlp=True: no MLP in the model (the architecture '
            "specs' mlp_units match none of its modules)")
    if needs_task_loss(recon, model_units(model) + mlps):
        require_rpn(model)


def batch_chunks(batch: Dict, size: Optional[int]) -> List[Dict]:
    """``batch`` (a data loader's ``inputs`` and ``data_samples``) cut into
    consecutive batches of ``size`` images (None: ``[batch]``)."""
    total = len(batch['inputs'])
    size = size or total
    return [{key: value[i:i + size] for key, value in batch.items()}
            for i in range(0, total, size)]


def _chunked(float_model, quant_cfg: QuantConfig, batch: Dict,
             names: List[str]):
    """``(runs, task losses)`` over the chunks of ``batch`` (the
    reconstruction's ``chunk_images``): ``run(m)`` is ``m.test_step`` of
    one chunk; the RPN objective of each chunk when the reconstruction's
    loss weights one of ``names``, else None."""
    cfg = quant_cfg.reconstruction_config()
    chunks = batch_chunks(batch, cfg.chunk_images)
    runs = [lambda m, b=b: m.test_step(b) for b in chunks]
    if not needs_task_loss(cfg, names):
        return runs, None
    return runs, [rpn_objective(float_model,
                                calibration_images(float_model, b))
                  for b in chunks]


def _memory(cfg) -> str:
    """How the reconstruction images are recorded, for the log."""
    chunks = 'at once' if cfg.chunk_images is None else \
        f'{cfg.chunk_images} at a time'
    where = 'in memory' if cfg.cache_dir is None else \
        f'cached in {cfg.cache_dir}'
    return f'recorded {chunks}, {where}'


def _eta_logger(what: str, total: int, describe: Callable[[Dict], str],
                after: Optional[Callable[[str, Dict], None]] = None):
    """``progress(k, name, stats)`` logging each finished item with the
    time left."""
    started = time.monotonic()

    def progress(k, name, stats):
        elapsed = time.monotonic() - started
        left = elapsed / (k + 1) * (total - k - 1)
        print_log(f'PTQ: {what} [{k + 1}/{total}] {name}: {describe(stats)}'
                  f'; eta {left:.0f} s', logger='current')
        if after is not None:
            after(name, stats)

    return progress


def reconstruct_mlps_on(quant_model, float_model, quant_cfg: QuantConfig,
                        batch: Dict) -> Dict:
    """APHQ-ViT's MLP reconstruction of ``quant_model`` (converted, not yet
    calibrated: its quantizers pass floats through) against
    ``float_model`` on ``batch`` (:func:`mmcd.core.quant.
    mlp_reconstruction.reconstruct_mlps`), each MLP's loss and the time
    left in the log."""
    cfg = quant_cfg.reconstruction_config()
    names = [n for n, _ in find_mlps(quant_model)]
    print_log(f'PTQ: MLP reconstruction (GELU -> ReLU) of {len(names)} '
              f'MLPs on {len(batch["inputs"])} images ({_memory(cfg)}), '
              f'{cfg.mlp_iters} iterations each, loss {cfg.loss!r}',
              logger='current')
    progress = _eta_logger(
        'MLP', len(names), lambda s: f'loss {s["loss_first"]:.4g} -> '
        f'{s["loss_last"]:.4g}, fc2 input bound {s["bound"]:.4g}')
    runs, task_losses = _chunked(float_model, quant_cfg, batch, names)
    return reconstruct_mlps(quant_model, float_model, runs, cfg, task_losses,
                            progress)


def reconstruct_on(quant_model, float_model, quant_cfg: QuantConfig,
                   batch: Dict, units: Optional[List[str]] = None,
                   after_unit: Optional[Callable[[str, Dict], None]] = None
                   ) -> Dict:
    """Block reconstruction of the calibrated ``quant_model`` against
    ``float_model`` on ``batch`` (:func:`mmcd.core.quant.reconstruction.
    reconstruct`), unit by unit in model order (``units``: default all of
    :func:`model_units`), each unit's output error before and after and the
    time left in the log; ``after_unit(name, stats)`` after each (a tool
    saves its progress there)."""
    cfg = quant_cfg.reconstruction_config()
    units = model_units(quant_model) if units is None else units
    print_log(f'PTQ: reconstructing {len(units)} units on '
              f'{len(batch["inputs"])} images ({_memory(cfg)}), {cfg.iters} '
              f'iterations each, batch {cfg.batch_size}, loss {cfg.loss!r}, '
              f'drop_prob {cfg.drop_prob}, input_prob {cfg.keep_input}',
              logger='current')
    progress = _eta_logger(
        'block', len(units), lambda s: f'output error '
        f'{s["loss_before"]:.4g} -> {s["loss_after"]:.4g}, '
        f'{100 * s["rounded_up"]:.1f}% of weights rounded up', after_unit)
    runs, task_losses = _chunked(float_model, quant_cfg, batch, units)
    return reconstruct(quant_model, float_model, runs, units, cfg, progress,
                       task_losses)


def evaluate_with_features(model, extract_feat: Callable, loop,
                           predictions: Optional[List] = None) -> Dict:
    """:func:`evaluate` of a copy of ``model`` whose backbone + neck is
    ``extract_feat`` (e.g. an onnxruntime session), its heads its own. An
    instance attribute: a module assigned with ``model.extract_feat = ...``
    becomes a submodule, and the class's own ``extract_feat`` method is
    still what ``model.extract_feat`` finds (an earlier version of the
    export tool's draws evaluated the simulation that way)."""
    model = copy.deepcopy(model)
    object.__setattr__(model, 'extract_feat', extract_feat)
    return evaluate(model, loop, predictions)


@torch.no_grad()
def evaluate(model, loop, predictions: Optional[List] = None) -> Dict:
    """Run ``loop``'s dataloader and evaluator on ``model`` (what MMEngine's
    Val/TestLoop do, without their hooks). ``predictions``: a list that
    receives each image's ``(boxes, scores, labels)`` (CPU tensors)."""
    model.eval()
    step = model.val_step if isinstance(loop, ValLoop) else model.test_step
    bar = ProgressBar(len(loop.dataloader))
    for batch in loop.dataloader:
        outputs = step(batch)
        if predictions is not None:
            for sample in outputs:
                found = sample.pred_instances
                predictions.append((found.bboxes.cpu(), found.scores.cpu(),
                                    found.labels.cpu()))
        loop.evaluator.process(data_samples=outputs, data_batch=batch)
        bar.update()
    print()
    return loop.evaluator.evaluate(len(loop.dataloader.dataset))
