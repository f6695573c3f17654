"""Plots of activation-outlier and alignment statistics (as returned by
:func:`mmcd.engine.hooks.collect_activation_stats`, one entry per checkpoint):
per-layer ``max |x|``, per-pair alignment, and the ``|x|`` histogram of the
worst layer. Matplotlib's object API (no pyplot, no backend to pick)."""
import numpy as np
from matplotlib.figure import Figure

POINT_KINDS = (('output', 'block output'), ('ffn_hidden', 'FFN hidden'),
               ('attn_input', 'attention input'))
PAIR_KINDS = (('ffn', 'FFN fc1 -> fc2'), ('vo', 'attention value -> output'),
              ('qk', 'attention query <-> key'))


def grouped_bars(ax, names, series, labels, log=False):
    width = 0.8 / len(series)
    x = np.arange(len(names))
    for i, (values, label) in enumerate(zip(series, labels)):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width,
               label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha='right', fontsize=7)
    if log:
        ax.set_yscale('log')
    ax.grid(axis='y', alpha=0.3)


def short(name):
    """'backbone.stages.2.blocks.1/ffn_hidden' -> 's2.b1'."""
    block = name.split('/')[0].replace('backbone.', '')
    return block.replace('stages.', 's').replace('.blocks.', '.b').replace(
        'blocks.', 'b')


def plot_panels(path, labels, panels):
    """One grouped-bar panel per entry of ``panels``: ``(title, ylabel,
    names, series, log, reference line or None)``."""
    fig = Figure(figsize=(11, 10))
    axes = fig.subplots(len(panels), 1)
    for ax, (title, ylabel, names, series, log, ref) in zip(axes, panels):
        grouped_bars(ax, names, series, labels, log=log)
        if ref is not None:
            ax.axhline(ref, color='gray', lw=1, ls='--')
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_max_activation(results, labels, path):
    panels = []
    for kind, title in POINT_KINDS:
        names = [n for n in results[0][0] if n.endswith('/' + kind)]
        series = [[stats[n]['max_abs'] for n in names]
                  for stats, _, _ in results]
        panels.append((f'max |activation|: {title}', 'max |x| (log)',
                       [short(n) for n in names], series, True, None))
    plot_panels(path, labels, panels)


def plot_alignment(results, labels, path):
    panels = []
    for kind, title in PAIR_KINDS:
        names = [n for n in results[0][1] if n.endswith('.' + kind)]
        series = [[align[n]['mean'] for n in names]
                  for _, align, _ in results]
        panels.append((f'alignment of {title} (mean over heads; random = 1)',
                       'alignment', [short(n.rsplit('.', 1)[0])
                                     for n in names], series, False, 1.0))
    plot_panels(path, labels, panels)


def plot_histogram(results, labels, path):
    worst = max(results[0][0], key=lambda n: max(
        stats[n]['max_abs'] for stats, _, _ in results))
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    top = max(stats[worst]['max_abs'] for stats, _, _ in results)
    bins = np.linspace(0, top, 80)
    for (_, _, recorder), label in zip(results, labels):
        ax.hist(recorder.samples(worst).numpy(), bins=bins,
                histtype='step', linewidth=1.6, label=label, log=True)
    ax.set_title(f'|activation| at {worst} (largest max |x|)')
    ax.set_xlabel('|x|')
    ax.set_ylabel('count (log)')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return worst
