"""mmcd: Colinearity Decay and low-bit quantization for vision-transformer
detectors in MMDetection.

``import mmcd`` (or ``custom_imports=dict(imports=['mmcd'])`` in a config)
registers mmcd's optim wrappers, hooks and models in MMEngine's registries
and makes MMEngine 0.10.7 checkpoints loadable under torch >= 2.6.

Layers: :mod:`mmcd.core` is pure PyTorch (no OpenMMLab import);
:mod:`mmcd.engine` adapts it to MMEngine; :mod:`mmcd.models` registers
ViTDet's backbone and neck in MMDetection; :mod:`mmcd.datasets` generates the
embedded toy COCO set; :mod:`mmcd.compat` holds stack fixes.
"""
from . import engine  # noqa: F401  (registers optim wrappers and hooks)
from . import models  # noqa: F401  (registers ViTDet, SimpleFPN, LN2d)
from .compat import install_checkpoint_compat
from .version import __version__

install_checkpoint_compat()

__all__ = ['__version__']
