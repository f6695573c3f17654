"""Models registered in MMDetection's MODELS: ViTDet's plain ViT backbone,
SimpleFPN, LN2d, and the QATDetector builder."""
from .backbones import ViTDet
from .layers import LN2d
from .necks import SimpleFPN
from .qat_detector import QATDetector

__all__ = ['ViTDet', 'LN2d', 'SimpleFPN', 'QATDetector']
