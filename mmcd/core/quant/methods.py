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
``aphq-vit``  APHQ grid     APHQ grid     APHQ grid    RepQ-ViT  APH + MLP
============  ============  ============  ===========  ========  ==========

``qdrop`` is the QDrop row of APHQ-ViT's tables: uniform quantizers
calibrated, then block reconstruction (AdaRound, learned activation steps,
QDrop's dropping; reconstruction.py). ``aphq-vit`` is APHQ-ViT's detection
recipe: MLP reconstruction (GELU -> ReLU in the Transformer MLPs,
mlp_reconstruction.py), then its calibration: every layer on the float
model's inputs, its grid searches (aphq_searches.py, the Conv2d grid for
convolutions, the post-softmax quantizer uniform with the same grid),
RepQ-ViT's reparameterization followed by a new search of the
reparameterized inputs, the attention matmuls' operands per head searched
on the product's error; then block reconstruction with the APH loss
(reconstruction_losses.py); docs/en/quantization.md says what still
differs from its code. Any method takes
reconstruction options (``QuantConfig.reconstruction``), which override the
method's. (quantizers.py and reparam.py give the formulas and sources;
reparam.py why DopQ-ViT's MOSF is not a separate target.) Pure PyTorch.
"""
from dataclasses import dataclass
from typing import Optional, Union

from ..registry import Registry
from .aphq_searches import MATMUL_SEARCHES
from .reconstruction import ReconstructionConfig
from .quantizers import (RANGE_SEARCHES, FakeQuantizer, LogSqrt2Quantizer,
                         TanQuantizer, UniformQuantizer)

#: Post-softmax quantizers by name: ``factory(bits) -> FakeQuantizer``.
POST_SOFTMAX_QUANTIZERS = Registry('post-softmax quantizer')
POST_SOFTMAX_QUANTIZERS.register(
    lambda bits: UniformQuantizer(bits, None, 'minmax'), name='uniform')
POST_SOFTMAX_QUANTIZERS.register(
    lambda bits: UniformQuantizer(bits, None, 'aphq-act-grid'),
    name='aphq-grid')
POST_SOFTMAX_QUANTIZERS.register(LogSqrt2Quantizer, name='log-sqrt2')
POST_SOFTMAX_QUANTIZERS.register(TanQuantizer, name='tanq')
#: what the layers of a calibration pass see (QuantMethod)
CALIBRATION_INPUTS = ('quantized', 'float')
SHARED_CALLS = ('first', 'all')


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
    quantizer; ``integer_target``: the reparameterization's target zero point
    rounded to an integer (APHQ-ViT's code rounds it; a deployment profile sets
    it: reparam.py says what it changes); ``conv_act_search`` /
    ``conv_weight_search``: the searches of Conv2d layers when they differ
    (None: the Linear ones); ``calibration_inputs``: ``'quantized'``, each
    layer calibrated on the inputs of the already-quantized layers before it
    (RepQ-ViT), or ``'float'``, on the float model's (APHQ-ViT);
    ``search_after_reparam``: the reparameterized inputs get a new search
    (APHQ-ViT) instead of the target grid (RepQ-ViT); ``matmul_search``: a
    registered joint search of the attention matmuls' operands, quantized per
    head (``aphq_searches.MATMUL_SEARCHES``; None: each operand per tensor with
    its own search; attention that does not say its heads keeps that);
    ``shared_calls``: how a module called several times per calibration pass
    (mmdet's RPN head runs on every FPN level) is calibrated: ``'first'``, on
    its first call (RepQ-ViT's detection code: each quantizer initializes on
    the first tensor it sees, so the RPN's on the finest level), or
    ``'all'``, on all calls at once (APHQ-ViT's calibrator gathers every call
    of a layer; QDrop's observers update on every call); ``residual_adds``:
    the residual input of each residual addition quantized per tensor with
    the activation quantizer (TensorRT's Q/DQ placement, residual.py; a
    deployment profile sets it)."""
    name: str
    act_search: str
    weight_search: str
    softmax: str
    reparameterize: bool = False
    reconstruction: Optional[ReconstructionConfig] = None
    symmetric: bool = False
    integer_target: bool = False
    conv_act_search: Optional[str] = None
    conv_weight_search: Optional[str] = None
    calibration_inputs: str = 'quantized'
    search_after_reparam: bool = False
    matmul_search: Optional[str] = None
    shared_calls: str = 'first'
    residual_adds: bool = False

    def __post_init__(self):
        for field_name, registry in (
                ('act_search', RANGE_SEARCHES),
                ('weight_search', RANGE_SEARCHES),
                ('conv_act_search', RANGE_SEARCHES),
                ('conv_weight_search', RANGE_SEARCHES),
                ('matmul_search', MATMUL_SEARCHES),
                ('softmax', POST_SOFTMAX_QUANTIZERS)):
            if getattr(self, field_name) is None and field_name in (
                    'conv_act_search', 'conv_weight_search',
                    'matmul_search'):
                continue
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
        if self.calibration_inputs not in CALIBRATION_INPUTS:
            raise ValueError(
                f'{self.name}: calibration_inputs must be one of '
                f'{CALIBRATION_INPUTS}, got {self.calibration_inputs!r}')
        if self.shared_calls not in SHARED_CALLS:
            raise ValueError(
                f'{self.name}: shared_calls must be one of {SHARED_CALLS}, '
                f'got {self.shared_calls!r}')
        for flag in ('reparameterize', 'symmetric', 'integer_target',
                     'search_after_reparam', 'residual_adds'):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f'{self.name}: {flag} must be True or '
                                 f'False, got {getattr(self, flag)!r}')
        if self.symmetric and not isinstance(self.softmax_quantizer(8),
                                             UniformQuantizer):
            raise ValueError(
                f'{self.name}: symmetric grids need a uniform post-softmax '
                f'quantizer, {self.softmax!r} is not one')

    def act_quantizer(self, bits: int, conv: bool = False
                      ) -> UniformQuantizer:
        """The input quantizer of a Linear (or of a Conv2d: ``conv``) and
        of the attention matmuls."""
        search = conv and self.conv_act_search or self.act_search
        return UniformQuantizer(bits, None, search, symmetric=self.symmetric)

    def weight_quantizer(self, bits: int, conv: bool = False
                         ) -> UniformQuantizer:
        search = conv and self.conv_weight_search or self.weight_search
        return UniformQuantizer(bits, 0, search, symmetric=self.symmetric)

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
    'qdrop', 'quantile', 'quantile', 'uniform', shared_calls='all',
    reconstruction=ReconstructionConfig()))
QUANT_METHODS.register(QuantMethod(
    'aphq-vit', 'aphq-act-grid', 'aphq-grid', 'aphq-grid',
    reparameterize=True, conv_act_search='aphq-conv-act-grid',
    conv_weight_search='aphq-conv-grid', calibration_inputs='float',
    search_after_reparam=True, integer_target=True,
    matmul_search='aphq-product', shared_calls='all',
    reconstruction=ReconstructionConfig(loss='aph', input_prob=0.5,
                                        mlp=True, order='in_turn')))
