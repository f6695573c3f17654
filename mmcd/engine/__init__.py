"""MMEngine adapters: optim wrappers, hooks, calibration helpers and tool
set-up."""
from .calibration import (CalibrationOptions, calibrate_on, calibration_loader,
                          evaluate, quantize_copy, run_test_steps)
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
    'SameOnAllRanksSampler', 'CalibrationOptions', 'calibrate_on',
    'calibration_loader', 'evaluate', 'quantize_copy', 'run_test_steps'
]
