"""Quantization core (fake quantization): post-training quantization and
quantization-aware training, pure PyTorch."""
from .aphq_searches import MATMUL_SEARCHES
from .attention import QuantWindowMSA
from .multihead_attention import QuantMultiheadAttention
from .convert import (LayerBits, QuantConfig, activation_quantizers, calibrate,
                      fake_quantizers, format_precision_plan, layer_quantizers,
                      precision_plan, quantize_model, set_quant_state)
from .methods import (POST_SOFTMAX_QUANTIZERS, QUANT_METHODS, QuantMethod,
                      get_method)
from .modules import (FLOAT_ATTENTION_KERNELS, QUANTIZED_MODULES, MatMul,
                      QuantConv2d, QuantizedModule, QuantLinear, QuantMatMul)
from .qat import (QAT_METHODS, OscillationTracker, QATConfig, QATMethod,
                  activate_qat, freeze_confident_weights, get_qat_method,
                  initialize_qat, mask_frozen_gradients, prepare_qat,
                  restore_frozen_weights)
from .qat_quantizers import (QAT_ACT_QUANTIZERS, QAT_WEIGHT_QUANTIZERS,
                             LsqActQuantizer, LsqWeightQuantizer,
                             StatsWeightQuantizer)
from .profiles import DEFAULT_PROFILE, DEPLOY_PROFILES, DeployProfile
from .qk_reparam import QKReparam
from .residual import (QuantFPN, QuantResidualAdd, QuantSwinBlock,
                       ResidualAdd)
from .quantizers import (RANGE_SEARCHES, FakeQuantizer, LogSqrt2Quantizer,
                         TanQuantizer, UniformQuantizer)
from .reconstruction import (AdaRoundQuantizer, ReconstructionConfig,
                             reconstruct)
from .reconstruction_losses import RECONSTRUCTION_LOSSES, ReconstructionLoss
from .reparam import find_norm_linear_pairs, reparameterize, target_params
from .saved_state import restore_quantized

__all__ = [
    'QuantWindowMSA', 'QuantMultiheadAttention', 'LayerBits', 'QuantConfig',
    'activation_quantizers', 'layer_quantizers', 'calibrate',
    'precision_plan', 'format_precision_plan',
    'quantize_model', 'fake_quantizers', 'set_quant_state', 'QuantConv2d',
    'MatMul', 'QuantLinear', 'QuantMatMul', 'LogSqrt2Quantizer',
    'TanQuantizer',
    'UniformQuantizer', 'find_norm_linear_pairs', 'reparameterize',
    'target_params', 'QAT_METHODS', 'OscillationTracker', 'QATConfig',
    'activate_qat', 'freeze_confident_weights', 'initialize_qat',
    'prepare_qat', 'mask_frozen_gradients', 'restore_frozen_weights',
    'LsqActQuantizer', 'LsqWeightQuantizer', 'StatsWeightQuantizer',
    'QKReparam', 'QuantMethod', 'get_method', 'QATMethod', 'get_qat_method',
    'QUANT_METHODS', 'POST_SOFTMAX_QUANTIZERS', 'RANGE_SEARCHES',
    'MATMUL_SEARCHES',
    'QUANTIZED_MODULES', 'FLOAT_ATTENTION_KERNELS',
    'QuantizedModule', 'QAT_WEIGHT_QUANTIZERS',
    'QAT_ACT_QUANTIZERS', 'FakeQuantizer', 'AdaRoundQuantizer',
    'ReconstructionConfig', 'reconstruct', 'restore_quantized',
    'RECONSTRUCTION_LOSSES', 'ReconstructionLoss', 'DEPLOY_PROFILES',
    'DeployProfile', 'DEFAULT_PROFILE', 'ResidualAdd', 'QuantResidualAdd',
    'QuantSwinBlock', 'QuantFPN'
]
