"""Models registered in MMDetection's MODELS: ViTDet's plain ViT backbone,
SimpleFPN and LN2d."""
from .backbones import ViTDet
from .layers import LN2d
from .necks import SimpleFPN

__all__ = ['ViTDet', 'LN2d', 'SimpleFPN']
