"""The strength trade-off figure of the experiment (tools/analysis/
experiment.py --sweep): AP and outlier statistics against the strength of a
regularizer, with the baseline's seed-to-seed spread as a band. Matplotlib's
object API."""
from typing import Dict, List, Optional

from matplotlib.figure import Figure

from mmcd.core.activation_stats import model_summary

AP = 'coco/bbox_mAP'
CURVES = (('float', 'float'), ('repq-vit/W4A4', 'W4A4 repq-vit'),
          ('minmax/W4A4', 'W4A4 minmax'))


def plot_tradeoff(sweep: Dict[str, tuple], baseline: Optional[List[Dict]],
                  path: str) -> None:
    """``sweep``: ``{'cd@0.5': (metrics by cell name, outlier stats)}``;
    ``baseline``: the baseline's metrics per seed (the band: mean +- std of
    each curve's AP over seeds), or None."""
    families = sorted({k.split('@')[0] for k in sweep})
    fig = Figure(figsize=(6 * len(families), 8))
    axes = fig.subplots(2, len(families), squeeze=False)
    for col, family in enumerate(families):
        points = sorted(((float(k.split('@')[1]), v) for k, v in
                         sweep.items() if k.startswith(family + '@')),
                        key=lambda p: p[0])
        xs = [x for x, _ in points]
        top, bottom = axes[0, col], axes[1, col]
        for (key, label), color in zip(CURVES, ('k', 'tab:blue',
                                                'tab:orange')):
            top.plot(xs, [100 * row[key][AP] for _, (row, _) in points],
                     'o-', color=color, label=label)
            if baseline and len(baseline) > 1 and all(key in r
                                                      for r in baseline):
                values = [100 * r[key][AP] for r in baseline]
                mean = sum(values) / len(values)
                std = (sum((v - mean)**2 for v in values) /
                       (len(values) - 1))**0.5
                top.axhspan(mean - std, mean + std, color=color, alpha=0.12)
        top.set_title(f'{family}: box AP vs strength (bands: baseline mean '
                      '± std over seeds)', fontsize=9)
        top.set_ylabel('box AP (%)')
        top.legend(fontsize=8)
        summaries = [model_summary(stats['stats'], stats['alignment'])
                     for _, (_, stats) in points]
        peaks = [summary['max_abs'] for summary in summaries]
        aligns = [summary['alignment'] for summary in summaries]
        bottom.plot(xs, peaks, 's-', color='tab:red', label='largest max |x|')
        bottom.set_ylabel('largest max |x|', color='tab:red')
        twin = bottom.twinx()
        twin.plot(xs, aligns, 'd--', color='tab:green',
                  label='mean alignment')
        twin.set_ylabel('mean alignment', color='tab:green')
        bottom.set_xlabel(f'{family} strength')
        for ax in (top, bottom):
            ax.set_xscale('symlog', linthresh=min(
                [x for x in xs if x > 0] or [1.0]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
