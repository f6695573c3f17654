"""Pure-PyTorch core of mmcd: one spec per backbone family, matrix-pair
discovery, the regularizer interface with Colinearity Decay, the comparison
regularizers and the planted alignment growth, activation statistics and
(in :mod:`.quant`) post-training quantization. Nothing here imports
OpenMMLab."""
from .activation_penalty import ActivationPenalty, ActivationPenaltyRegularizer
from .alignment_growth import AlignmentGrowthRegularizer
from .activation_stats import (ActivationRecorder, StatsAccumulator,
                               probe_points, tensor_stats)
from .architectures import (ARCHITECTURES, SWIN_RULES, VIT_RULES,
                            ArchitectureSpec, pair_rules)
from .colinearity import (ColinearityDecay, ColinearityDecayRegularizer,
                          SpectralNormEstimator, alignment,
                          colinearity_decay_deltas, penalty_gradients)
from .errors import ConfigError
from .pairs import PAIR_KINDS, MatrixPair, PairRule, discover_pairs
from .registry import Registry
from .regularizers import REGULARIZERS, Regularizer, build_regularizer
from .spectral_decay import SelectiveSpectralDecay, SpectralDecayRegularizer

__all__ = [
    'ConfigError',
    'ActivationRecorder', 'StatsAccumulator', 'probe_points', 'tensor_stats',
    'ActivationPenalty', 'ColinearityDecay', 'SpectralNormEstimator',
    'alignment', 'colinearity_decay_deltas', 'penalty_gradients',
    'ARCHITECTURES', 'ArchitectureSpec', 'pair_rules', 'Registry',
    'PAIR_KINDS', 'SWIN_RULES', 'VIT_RULES',
    'MatrixPair',
    'PairRule', 'discover_pairs', 'SelectiveSpectralDecay',
    'ColinearityDecayRegularizer', 'SpectralDecayRegularizer',
    'ActivationPenaltyRegularizer', 'AlignmentGrowthRegularizer',
    'REGULARIZERS', 'Regularizer',
    'build_regularizer'
]
