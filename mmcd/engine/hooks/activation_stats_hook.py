"""Activation-outlier and alignment statistics during validation / test.

    custom_hooks = [dict(type='ActivationStatsHook', stages=('val', 'test'))]

During the epoch, forward hooks record, for every Transformer block that
CD's pair rules find, the block output, the FFN hidden activation (input of
fc2) and the attention input (input of qkv): ``max |x|``, the 99.99th
percentile of ``|x|``, ``max / median`` and the kurtosis
(:mod:`mmcd.core.activation_stats`); after it, the alignment of every pair
(mean and max over heads, :func:`mmcd.core.colinearity.alignment`). All of
it is logged as scalars through the runner's visualizer (TensorBoard when a
``TensorboardVisBackend`` is configured), under
``outliers/<point>/<stat>`` and ``alignment/<pair>/{mean,max}``, and written
to ``activation_stats_<stage>.json`` in the log dir.

Priority LOW: when a ``PostTrainingQuantHook`` swaps in a quantized copy,
the statistics are those of the model actually evaluated.
"""
import json
import os.path as osp
from typing import Dict, Iterable, Sequence

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from mmcd.core.activation_stats import ActivationRecorder, probe_points
from mmcd.core.architectures import pair_rules
from mmcd.core.colinearity import alignment
from mmcd.core.pairs import discover_pairs

from ..calibration import run_test_steps
from ..model_utils import bare_model


def model_pairs(model: torch.nn.Module):
    """CD's pairs of a model (the rules of every architecture spec), for
    statistics."""
    pairs = discover_pairs(model, pair_rules())
    if not pairs:
        raise ValueError('no Transformer blocks found: the activation '
                         'statistics follow CD\'s built-in pair rules')
    return pairs


@torch.no_grad()
def pair_alignment(pairs) -> Dict[str, Dict[str, float]]:
    """``{pair name: {'mean': ..., 'max': ...}}`` over heads."""
    out = {}
    for pair in pairs:
        align = alignment(*pair.matrices()).float()
        out[pair.name] = dict(mean=float(align.mean()),
                              max=float(align.max()))
    return out


@torch.no_grad()
def collect_activation_stats(model: torch.nn.Module, batches: Iterable,
                             num_images: int, max_samples: int = 1 << 16):
    """Run ``model.test_step`` on the first ``num_images`` batches and
    return ``(stats, alignment, recorder)``; the recorder keeps the ``|x|``
    samples for histograms."""
    model = bare_model(model)
    pairs = model_pairs(model)
    recorder = ActivationRecorder(probe_points(model, pairs), max_samples)
    model.eval()
    try:
        run_test_steps(model, batches, num_images)
    finally:
        recorder.remove()
    return recorder.results(), pair_alignment(pairs), recorder


@HOOKS.register_module()
class ActivationStatsHook(Hook):
    """Record outlier and alignment statistics (module docstring).

    Args:
        stages: ``'val'`` and/or ``'test'``.
        max_samples: values kept per probe point for percentiles.
    """
    priority = 'LOW'

    def __init__(self, stages: Sequence[str] = ('val', 'test'),
                 max_samples: int = 1 << 16):
        unknown = set(stages) - {'val', 'test'}
        if unknown:
            raise ValueError(f"stages must be 'val' and/or 'test', got "
                             f'{sorted(unknown)}')
        self.stages, self.max_samples = tuple(stages), max_samples
        self._recorder = self._pairs = None

    def _start(self, runner, stage):
        if stage not in self.stages:
            return
        model = runner.model
        model = bare_model(model)
        self._pairs = model_pairs(model)
        self._recorder = ActivationRecorder(
            probe_points(model, self._pairs), self.max_samples)

    def _finish(self, runner, stage):
        if self._recorder is None:
            return
        self._recorder.remove()
        stats = self._recorder.results()
        align = pair_alignment(self._pairs)
        self._recorder = self._pairs = None
        scalars = {f'outliers/{point}/{key}': value
                   for point, values in stats.items()
                   for key, value in values.items()}
        scalars.update({f'alignment/{pair}/{key}': value
                        for pair, values in align.items()
                        for key, value in values.items()})
        runner.visualizer.add_scalars(scalars, step=runner.iter)
        if runner.rank == 0:
            path = osp.join(runner.log_dir, f'activation_stats_{stage}.json')
            with open(path, 'w') as f:
                json.dump(dict(iter=runner.iter, stats=stats,
                               alignment=align), f, indent=2)

    def before_val_epoch(self, runner) -> None:
        self._start(runner, 'val')

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._finish(runner, 'val')

    def before_test_epoch(self, runner) -> None:
        self._start(runner, 'test')

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._finish(runner, 'test')
