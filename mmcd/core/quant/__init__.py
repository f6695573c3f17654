"""Quantization core (fake quantization): post-training quantization and
quantization-aware training, pure PyTorch."""
from .attention import QuantWindowMSA
from .convert import (METHODS, LayerBits, QuantConfig, activation_quantizers,
                      calibrate, format_precision_plan, layer_quantizers,
                      precision_plan, quantize_model, quantizers,
                      set_quant_state)
from .modules import MatMul, QuantConv2d, QuantLinear, QuantMatMul
from .methods import QuantMethod, get_method, register_method
from .qat import (QAT_METHODS, OscillationTracker, QATConfig, QATMethod,
                  activate_qat, freeze_confident_weights, get_qat_method,
                  initialize_qat, mask_frozen_gradients, prepare_qat,
                  register_qat_method, restore_frozen_weights)
from .qat_quantizers import (LsqActQuantizer, LsqWeightQuantizer,
                             StatsWeightQuantizer)
from .qk_reparam import QKReparam
from .quantizers import LogSqrt2Quantizer, TanQuantizer, UniformQuantizer
from .reparam import find_norm_linear_pairs, reparameterize, target_params

__all__ = [
    'QuantWindowMSA', 'METHODS', 'LayerBits', 'QuantConfig',
    'activation_quantizers', 'layer_quantizers', 'calibrate',
    'precision_plan', 'format_precision_plan',
    'quantize_model', 'quantizers', 'set_quant_state', 'QuantConv2d',
    'MatMul', 'QuantLinear', 'QuantMatMul', 'LogSqrt2Quantizer', 'TanQuantizer',
    'UniformQuantizer', 'find_norm_linear_pairs', 'reparameterize',
    'target_params', 'QAT_METHODS', 'OscillationTracker', 'QATConfig',
    'activate_qat', 'freeze_confident_weights', 'initialize_qat',
    'prepare_qat', 'mask_frozen_gradients', 'restore_frozen_weights',
    'LsqActQuantizer', 'LsqWeightQuantizer', 'StatsWeightQuantizer',
    'QKReparam', 'QuantMethod', 'get_method', 'register_method', 'QATMethod',
    'get_qat_method', 'register_qat_method'
]
