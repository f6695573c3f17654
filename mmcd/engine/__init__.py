"""MMEngine adapters: optim wrappers, hooks and tool set-up."""
from .hooks import (ActivationStatsHook, PostTrainingQuantHook,
                    QuantAwareTrainingHook, RNGStateHook)
from .optim_wrapper_constructors import LayerDecayOptimWrapperConstructor
from .optim_wrappers import (ColinearityDecayAmpOptimWrapper,
                             ColinearityDecayOptimWrapper)
from .samplers import SameOnAllRanksSampler

__all__ = [
    'ColinearityDecayOptimWrapper', 'ColinearityDecayAmpOptimWrapper',
    'PostTrainingQuantHook', 'LayerDecayOptimWrapperConstructor',
    'ActivationStatsHook', 'QuantAwareTrainingHook', 'RNGStateHook',
    'SameOnAllRanksSampler'
]
