from .activation_stats_hook import (ActivationStatsHook,
                                    collect_activation_stats)
from .post_training_quant_hook import (PostTrainingQuantHook,
                                       calibration_loader, evaluate,
                                       quantize_copy)
from .quant_aware_training_hook import QuantAwareTrainingHook
from .rng_state_hook import RNGStateHook

__all__ = [
    'ActivationStatsHook', 'collect_activation_stats',
    'PostTrainingQuantHook', 'calibration_loader', 'evaluate',
    'quantize_copy', 'QuantAwareTrainingHook', 'RNGStateHook'
]
