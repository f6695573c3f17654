from .colinearity_decay_optim_wrapper import (ColinearityDecayAmpOptimWrapper,
                                              ColinearityDecayOptimWrapper)

__all__ = ['ColinearityDecayOptimWrapper', 'ColinearityDecayAmpOptimWrapper']
