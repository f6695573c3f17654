"""Post-training quantization core (fake quantization), pure PyTorch."""
from .attention import QuantWindowMSA
from .convert import (METHODS, QuantConfig, calibrate, quantize_model,
                      quantizers, set_quant_state)
from .modules import MatMul, QuantConv2d, QuantLinear, QuantMatMul
from .quantizers import LogSqrt2Quantizer, TanQuantizer, UniformQuantizer
from .reparam import find_norm_linear_pairs, reparameterize, target_params

__all__ = [
    'QuantWindowMSA', 'METHODS', 'QuantConfig', 'calibrate',
    'quantize_model', 'quantizers', 'set_quant_state', 'QuantConv2d',
    'MatMul', 'QuantLinear', 'QuantMatMul', 'LogSqrt2Quantizer', 'TanQuantizer',
    'UniformQuantizer', 'find_norm_linear_pairs', 'reparameterize',
    'target_params'
]
