from .toy_coco import (CATEGORIES, ToyCocoSpec, ensure_toy_coco,
                       generate_toy_coco)

__all__ = ['CATEGORIES', 'ToyCocoSpec', 'ensure_toy_coco', 'generate_toy_coco']
