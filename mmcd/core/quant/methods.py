"""What each post-training quantization method name means, in one place.

A :class:`QuantMethod` names the range search of activations and weights
(:data:`~mmcd.core.quant.quantizers.RANGE_SEARCHES`), the post-softmax
quantizer (:data:`POST_SOFTMAX_QUANTIZERS`) and whether post-LayerNorm
inputs are reparameterized; ``QUANT_METHODS.register(QuantMethod(...))``
adds one (a new method is one registered instance), :func:`get_method`
looks one up by name. Built in:

=============  ============  ============  ============  ==================
name           activations   weights       post-softmax  reparameterization
=============  ============  ============  ============  ==================
``minmax``     min-max       min-max       uniform       none
``repq-vit``   quantile MSE  quantile MSE  log-sqrt2     RepQ-ViT's
``dopq-vit``   quantile MSE  quantile MSE  TanQ          RepQ-ViT's
=============  ============  ============  ============  ==================

(quantizers.py and reparam.py give the formulas and sources; reparam.py why
DopQ-ViT's MOSF is not a separate target.) Pure PyTorch.
"""
from dataclasses import dataclass
from typing import Union

from ..registry import Registry
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
    (reparam.py)."""
    name: str
    act_search: str
    weight_search: str
    softmax: str
    reparameterize: bool = False

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
        if not isinstance(self.reparameterize, bool):
            raise ValueError(f'{self.name}: reparameterize must be True or '
                             f'False, got {self.reparameterize!r}')

    def act_quantizer(self, bits: int) -> UniformQuantizer:
        return UniformQuantizer(bits, None, self.act_search)

    def weight_quantizer(self, bits: int) -> UniformQuantizer:
        return UniformQuantizer(bits, 0, self.weight_search)

    def softmax_quantizer(self, bits: int) -> FakeQuantizer:
        return POST_SOFTMAX_QUANTIZERS.get(self.softmax)(bits)


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
