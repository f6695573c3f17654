from .activation_stats_hook import (ActivationStatsHook,
                                    collect_activation_stats)
from .post_training_quant_hook import PostTrainingQuantHook
from .quant_aware_training_hook import (ConfidenceGuidedAnnealingHook,
                                        QuantAwareTrainingHook,
                                        QuantOscillationHook)
from .rng_state_hook import RNGStateHook

__all__ = [
    'ActivationStatsHook', 'collect_activation_stats',
    'PostTrainingQuantHook', 'QuantAwareTrainingHook',
    'ConfidenceGuidedAnnealingHook', 'QuantOscillationHook', 'RNGStateHook'
]
