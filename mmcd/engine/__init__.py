"""MMEngine adapters: optim wrappers, hooks and tool set-up."""
from .optim_wrappers import (ColinearityDecayAmpOptimWrapper,
                             ColinearityDecayOptimWrapper)

__all__ = ['ColinearityDecayOptimWrapper', 'ColinearityDecayAmpOptimWrapper']
