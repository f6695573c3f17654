"""Activation-outlier statistics, pure PyTorch.

Per recorded tensor (all batches of a run together):

* ``max_abs``: ``max |x|``;
* ``p9999``: the 99.99th percentile of ``|x|``;
* ``max_over_median``: ``max |x| / median |x|`` (how far the largest value
  stands above a typical one);
* ``kurtosis``: Pearson's ``E[(x - mu)^4] / sigma^4`` (3 for a Gaussian;
  heavy tails, i.e. outliers, make it large).

``max_abs`` and the moments behind the kurtosis are exact over all values;
the percentile and the median come from a uniform random subsample of at
most ``max_samples`` values per tensor, drawn with a seeded generator.
"""
from typing import Dict, Optional

import torch


def tensor_stats(x: torch.Tensor) -> Dict[str, float]:
    """The four statistics of one tensor (exact)."""
    acc = StatsAccumulator(max_samples=x.numel())
    acc.update(x)
    return acc.result()


class StatsAccumulator:
    """Accumulates the statistics over several tensors."""

    def __init__(self, max_samples: int = 1 << 16, seed: int = 0):
        self.max_samples = max_samples
        self.gen = torch.Generator().manual_seed(seed)
        self.count = 0
        self.moments = torch.zeros(4, dtype=torch.float64)  # sum x^1..x^4
        self.max_abs = 0.0
        self.samples = []

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).double().cpu()
        if flat.numel() == 0:
            return
        self.count += flat.numel()
        powers = torch.stack([flat, flat**2, flat**3, flat**4])
        self.moments += powers.sum(1)
        self.max_abs = max(self.max_abs, float(flat.abs().max()))
        if flat.numel() > self.max_samples:
            idx = torch.randint(flat.numel(), (self.max_samples, ),
                                generator=self.gen)
            flat = flat[idx]
        self.samples.append(flat.abs().float())

    def result(self) -> Optional[Dict[str, float]]:
        if self.count == 0:
            return None
        n = self.count
        m1, m2, m3, m4 = (self.moments / n).tolist()
        var = m2 - m1**2
        central4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
        samples = torch.cat(self.samples)
        if samples.numel() > self.max_samples:
            samples = samples[torch.randint(samples.numel(),
                                            (self.max_samples, ),
                                            generator=self.gen)]
        ordered = samples.sort().values
        median = float(ordered[(ordered.numel() - 1) // 2])
        p9999 = float(ordered[int(0.9999 * (ordered.numel() - 1))])
        return dict(
            max_abs=self.max_abs,
            p9999=p9999,
            max_over_median=self.max_abs / median if median > 0 else
            float('inf'),
            kurtosis=central4 / var**2 if var > 0 else float('nan'))


def model_summary(point_stats: Dict[str, Dict[str, float]],
                  alignment: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """One model's headline numbers: the largest ``max_abs`` and
    ``kurtosis`` over its probe points and the mean of its pairs' mean
    alignments."""
    return dict(
        max_abs=max(v['max_abs'] for v in point_stats.values()),
        kurtosis=max(v['kurtosis'] for v in point_stats.values()),
        alignment=sum(a['mean'] for a in alignment.values()) /
        len(alignment))


def probe_points(model: torch.nn.Module, pairs) -> Dict[str, tuple]:
    """Where to record, from CD's matrix pairs: each block's output, its
    FFN hidden activation (the input of fc2) and its attention input (the
    input of qkv). Returns ``{name: (module, 'input' | 'output')}`` with
    names ``<block>/output``, ``<block>/ffn_hidden``, ``<block>/attn_input``.
    """
    modules = dict(model.named_modules())
    points = {}
    for pair in pairs:
        block = pair.name.rsplit('.', 1)[0]
        if block in modules:
            points[f'{block}/output'] = (modules[block], 'output')
        if pair.kind == 'ffn':
            points[f'{block}/ffn_hidden'] = (pair.second, 'input')
        elif pair.kind == 'vo':
            points[f'{block}/attn_input'] = (pair.first, 'input')
    return dict(sorted(points.items()))


class ActivationRecorder:
    """Forward hooks that feed a :class:`StatsAccumulator` per probe point
    (see :func:`probe_points`)."""

    def __init__(self, points: Dict[str, tuple], max_samples: int = 1 << 16):
        self.accumulators = {}
        self.handles = []
        for name, (module, where) in points.items():
            acc = StatsAccumulator(max_samples)
            self.accumulators[name] = acc
            if where == 'input':
                self.handles.append(module.register_forward_pre_hook(
                    lambda m, args, acc=acc: acc.update(args[0])))
            else:
                self.handles.append(module.register_forward_hook(
                    lambda m, args, out, acc=acc: acc.update(
                        out[0] if isinstance(out, (tuple, list)) else out)))

    def results(self) -> Dict[str, Dict[str, float]]:
        return {name: res for name, acc in self.accumulators.items()
                if (res := acc.result()) is not None}

    def samples(self, name: str) -> torch.Tensor:
        """The recorded subsample of ``|x|`` at one probe point."""
        return torch.cat(self.accumulators[name].samples)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
