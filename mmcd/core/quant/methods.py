"""What each post-training quantization method name means, in one place.

A :class:`QuantMethod` names the range search of activations and weights,
the post-softmax quantizer and the LayerNorm reparameterization target;
:func:`register_method` adds one (a new method is one registered instance),
:func:`get_method` looks one up by name. Built in:

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
from typing import Dict, Union

from .quantizers import (SEARCHES, FakeQuantizer, LogSqrt2Quantizer,
                         TanQuantizer, UniformQuantizer)

SOFTMAX_QUANTIZERS = {
    'uniform': lambda bits: UniformQuantizer(bits, None, 'minmax'),
    'log-sqrt2': LogSqrt2Quantizer,
    'tanq': TanQuantizer,
}


@dataclass(frozen=True)
class QuantMethod:
    """A PTQ method: ``act_search`` / ``weight_search`` one of
    ``'minmax'``, ``'quantile'``, ``'clip-ratio'`` (weights);
    ``softmax`` one of :data:`SOFTMAX_QUANTIZERS`; ``reparameterize``:
    RepQ-ViT's scale reparameterization of post-LayerNorm inputs
    (reparam.py)."""
    name: str
    act_search: str
    weight_search: str
    softmax: str
    reparameterize: bool = False

    def __post_init__(self):
        for field_name in ('act_search', 'weight_search'):
            if getattr(self, field_name) not in SEARCHES:
                raise ValueError(f'{self.name}: {field_name} must be one of '
                                 f'{SEARCHES}')
        if self.softmax not in SOFTMAX_QUANTIZERS:
            raise ValueError(f'{self.name}: softmax must be one of '
                             f'{sorted(SOFTMAX_QUANTIZERS)}')
        if not isinstance(self.reparameterize, bool):
            raise ValueError(f'{self.name}: reparameterize must be True or '
                             f'False, got {self.reparameterize!r}')

    def act_quantizer(self, bits: int) -> UniformQuantizer:
        return UniformQuantizer(bits, None, self.act_search)

    def weight_quantizer(self, bits: int) -> UniformQuantizer:
        return UniformQuantizer(bits, 0, self.weight_search)

    def softmax_quantizer(self, bits: int) -> FakeQuantizer:
        return SOFTMAX_QUANTIZERS[self.softmax](bits)


QUANT_METHODS: Dict[str, QuantMethod] = {}


def register_method(method: QuantMethod) -> QuantMethod:
    if method.name in QUANT_METHODS:
        raise ValueError(f'quantization method {method.name!r} is '
                         'registered already')
    QUANT_METHODS[method.name] = method
    return method


def get_method(name: Union[str, QuantMethod]) -> QuantMethod:
    """The registered method of that name (a :class:`QuantMethod` is
    returned as it is)."""
    if isinstance(name, QuantMethod):
        return name
    if name not in QUANT_METHODS:
        raise ValueError(f'unknown quantization method {name!r}; '
                         f'registered: {", ".join(QUANT_METHODS)}')
    return QUANT_METHODS[name]


register_method(QuantMethod('minmax', 'minmax', 'minmax', 'uniform'))
register_method(QuantMethod('repq-vit', 'quantile', 'quantile', 'log-sqrt2',
                            reparameterize=True))
register_method(QuantMethod('dopq-vit', 'quantile', 'quantile', 'tanq',
                            reparameterize=True))
