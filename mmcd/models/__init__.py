"""Models registered in MMDetection's MODELS: ViTDet's plain ViT backbone,
SimpleFPN, LN2d, and the QATDetector builder; quantized twins of mmdet's
attention modules (quant_twins.py)."""
from . import quant_twins  # noqa: F401  (registers mmdet's WindowMSA twin)
from .backbones import ViTDet
from .layers import LN2d
from .necks import SimpleFPN
from .qat_detector import QATDetector

__all__ = ['ViTDet', 'LN2d', 'SimpleFPN', 'QATDetector']
