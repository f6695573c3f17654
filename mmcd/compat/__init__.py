"""Compatibility of the pinned OpenMMLab stack with current PyTorch."""
from .torch_checkpoint import (CheckpointLoadError,
                               allow_mmengine_checkpoint_globals,
                               load_from_local_weights_only)
from .torch_checkpoint import install as install_checkpoint_compat

__all__ = [
    'CheckpointLoadError', 'allow_mmengine_checkpoint_globals',
    'load_from_local_weights_only', 'install_checkpoint_compat'
]
