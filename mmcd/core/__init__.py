"""Pure-PyTorch core of mmcd: matrix-pair discovery, Colinearity Decay, the
comparison regularizers, activation statistics and (in :mod:`.quant`)
post-training quantization. Nothing here imports OpenMMLab."""
from .activation_penalty import ActivationPenalty
from .activation_stats import (ActivationRecorder, StatsAccumulator,
                               probe_points, tensor_stats)
from .colinearity import (ColinearityDecay, SpectralNormEstimator, alignment,
                          colinearity_decay_deltas, penalty_gradients)
from .pairs import (BUILTIN_RULES, PAIR_KINDS, SWIN_RULES, VIT_RULES,
                    MatrixPair, PairRule, discover_pairs)
from .spectral_decay import SelectiveSpectralDecay

__all__ = [
    'ActivationRecorder', 'StatsAccumulator', 'probe_points', 'tensor_stats',
    'ActivationPenalty', 'ColinearityDecay', 'SpectralNormEstimator',
    'alignment', 'colinearity_decay_deltas', 'penalty_gradients',
    'BUILTIN_RULES', 'PAIR_KINDS', 'SWIN_RULES', 'VIT_RULES', 'MatrixPair',
    'PairRule', 'discover_pairs', 'SelectiveSpectralDecay'
]
