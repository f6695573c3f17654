"""Figures of mmcd's analyses (matplotlib; imported by the analysis tools,
not by training)."""
from .outlier_plots import (plot_alignment, plot_histogram,
                            plot_max_activation)
from .tradeoff_plot import plot_tradeoff

__all__ = [
    'plot_max_activation', 'plot_alignment', 'plot_histogram', 'plot_tradeoff'
]
