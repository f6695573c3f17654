"""What each post-training quantization method name means, in one place.

A :class:`QuantMethod` names the range search of activations and weights
(:data:`~mmcd.core.quant.quantizers.RANGE_SEARCHES`), the post-softmax
quantizer (:data:`POST_SOFTMAX_QUANTIZERS`), whether post-LayerNorm
inputs are reparameterized and the reconstruction after calibration, if
any; ``QUANT_METHODS.register(QuantMethod(...))`` adds one (a new method is
one registered instance), :func:`get_method` looks one up by name. Built in:

============  ============  ============  ===========  ========  ==========
name          activations   weights       post-softmax reparam.  reconstr.
============  ============  ============  ===========  ========  ==========
``minmax``    min-max       min-max       uniform      none      none
``repq-vit``  quantile MSE  quantile MSE  log-sqrt2    RepQ-ViT  none
``dopq-vit``  quantile MSE  quantile MSE  TanQ         RepQ-ViT  none
``qdrop``     quantile MSE  quantile MSE  uniform      none      QDrop
``aphq-vit``  quantile MSE  quantile MSE  uniform      RepQ-ViT  APH + MLP
============  ============  ============  ===========  ========  ==========

``qdrop`` is the QDrop row of APHQ-ViT's tables: uniform quantizers
calibrated, then block reconstruction (AdaRound, learned activation steps,
QDrop's dropping; reconstruction.py). ``aphq-vit`` is APHQ-ViT's detection
recipe: MLP reconstruction (GELU -> ReLU in the Transformer MLPs,
mlp_reconstruction.py), RepQ-ViT's reparameterization with uniform
quantizers (its post-softmax too), then block reconstruction with the APH
loss (reconstruction_losses.py); its public code quantizes the attention
matmuls' operands per head and searches ranges its own way, mmcd per
tensor with its quantile search (docs/en/quantization.md). Any method takes
reconstruction options (``QuantConfig.reconstruction``), which override the
method's. (quantizers.py and reparam.py give the formulas and sources;
reparam.py why DopQ-ViT's MOSF is not a separate target.) Pure PyTorch.
"""
from dataclasses import dataclass
from typing import Optional, Union

from ..registry import Registry
from .reconstruction import ReconstructionConfig
from .quantizers import (RANGE_SEARCHES, FakeQuantizer, LogSqrt2Quantizer,
                         TanQuantizer, UniformQuantizer)

#: Post-softmax quantizers by name: ``factory(bits) -> FakeQuantizer``.
POST_SOFTMAX_QUANTIZERS = Registry('post-softmax quantizer')
POST_SOFTMAX_QUANTIZERS.register(
    lambda bits: UniformQuantizer(bits, None, 'minmax'), name='uniform')
POST_SOFTMAX_QUANTIZERS.register(LogSqrt2Quantizer, name='log-sqrt2')
POST_SOFTMAX_QUANTIZERS.register(TanQuantizer, name='tanq')


@dataclass(frozen=True)
class QuantMethod:
    """A PTQ method: ``act_search`` / ``weight_search`` registered range
    searches (``'minmax'``, ``'quantile'``, ``'clip-ratio'``...);
    ``softmax`` a registered post-softmax quantizer; ``reparameterize``:
    RepQ-ViT's scale reparameterization of post-LayerNorm inputs
    (reparam.py); ``reconstruction``: None (calibration only) or the
    reconstruction that follows calibration; ``symmetric``: every uniform
    grid symmetric with zero point 0 in signed integers (a deployment
    profile sets it: profiles.py), which needs a uniform post-softmax
    quantizer; ``integer_target``: the reparameterization's target zero
    point rounded to an integer (a deployment profile sets it: reparam.py
    says what it changes)."""
    name: str
    act_search: str
    weight_search: str
    softmax: str
    reparameterize: bool = False
    reconstruction: Optional[ReconstructionConfig] = None
    symmetric: bool = False
    integer_target: bool = False

    def __post_init__(self):
        for field_name, registry in (
                ('act_search', RANGE_SEARCHES),
                ('weight_search', RANGE_SEARCHES),
                ('softmax', POST_SOFTMAX_QUANTIZERS)):
            try:
                registry.get(getattr(self, field_name))
            except ValueError as err:
                raise ValueError(f'{self.name}: {field_name}: {err}') \
                    from None
        if not isinstance(self.reconstruction,
                          (ReconstructionConfig, type(None))):
            raise ValueError(f'{self.name}: reconstruction must be a '
                             'ReconstructionConfig or None, got '
                             f'{self.reconstruction!r}')
        for flag in ('reparameterize', 'symmetric', 'integer_target'):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f'{self.name}: {flag} must be True or '
                                 f'False, got {getattr(self, flag)!r}')
        if self.symmetric and not isinstance(self.softmax_quantizer(8),
                                             UniformQuantizer):
            raise ValueError(
                f'{self.name}: symmetric grids need a uniform post-softmax '
                f'quantizer, {self.softmax!r} is not one')

    def act_quantizer(self, bits: int) -> UniformQuantizer:
        return UniformQuantizer(bits, None, self.act_search,
                                symmetric=self.symmetric)

    def weight_quantizer(self, bits: int) -> UniformQuantizer:
        return UniformQuantizer(bits, 0, self.weight_search,
                                symmetric=self.symmetric)

    def softmax_quantizer(self, bits: int) -> FakeQuantizer:
        quantizer = POST_SOFTMAX_QUANTIZERS.get(self.softmax)(bits)
        if isinstance(quantizer, UniformQuantizer):
            quantizer.symmetric = self.symmetric
        return quantizer


#: PTQ methods by name.
QUANT_METHODS = Registry('quantization method')


def get_method(name: Union[str, QuantMethod]) -> QuantMethod:
    """The registered method of that name (a :class:`QuantMethod` is
    returned as it is)."""
    if isinstance(name, QuantMethod):
        return name
    return QUANT_METHODS.get(name)


QUANT_METHODS.register(QuantMethod('minmax', 'minmax', 'minmax', 'uniform'))
QUANT_METHODS.register(QuantMethod('repq-vit', 'quantile', 'quantile',
                                   'log-sqrt2', reparameterize=True))
QUANT_METHODS.register(QuantMethod('dopq-vit', 'quantile', 'quantile', 'tanq',
                                   reparameterize=True))
QUANT_METHODS.register(QuantMethod(
    'qdrop', 'quantile', 'quantile', 'uniform',
    reconstruction=ReconstructionConfig()))
QUANT_METHODS.register(QuantMethod(
    'aphq-vit', 'quantile', 'quantile', 'uniform', reparameterize=True,
    reconstruction=ReconstructionConfig(loss='aph', input_prob=0.5,
                                        mlp=True)))
