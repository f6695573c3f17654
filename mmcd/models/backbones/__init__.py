from .vit_det import ViTDet

__all__ = ['ViTDet']
