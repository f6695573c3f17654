"""Detectors the benchmarks time (``tools/benchmarks/``), built from the
project's configs with random weights: no data, no pretrained checkpoint."""
import os.path as osp
from typing import Dict, List, Tuple

import torch
from mmengine.config import Config

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
#: name: (description, config relative to the repository, input size h, w)
BENCHMARK_DETECTORS: Dict[str, Tuple[str, str, Tuple[int, int]]] = {
    'toy': ('toy Swin Mask R-CNN (256 px)',
            'configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py',
            (256, 256)),
    'swin-t': ('Mask R-CNN Swin-T (512x768 px)',
               'configs/cd/mask-rcnn_swin-t_cd.py', (512, 768)),
}


def build_detector(config: str) -> torch.nn.Module:
    """The detector of ``config`` (a path relative to the repository),
    randomly initialized (no pretrained backbone), in eval mode."""
    from mmdet.registry import MODELS
    cfg = Config.fromfile(osp.join(REPO, config))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model.eval()


def add_models_argument(parser) -> None:
    """``--models`` (default: all of :data:`BENCHMARK_DETECTORS`)."""
    parser.add_argument('--models', nargs='+',
                        default=list(BENCHMARK_DETECTORS),
                        choices=list(BENCHMARK_DETECTORS))


def random_inputs(size: Tuple[int, int], count: int,
                  gen: torch.Generator) -> Tuple[torch.Tensor, List]:
    """``count`` random images in [-1, 1] of ``size`` (h, w) and their
    data samples (image metadata only), for ``model.predict``."""
    from mmdet.structures import DetDataSample
    h, w = size
    meta = dict(img_shape=size, ori_shape=size, pad_shape=size,
                scale_factor=(1.0, 1.0), batch_input_shape=size)
    images = torch.rand(count, 3, h, w, generator=gen) * 2 - 1
    return images, [DetDataSample(metainfo=meta) for _ in range(count)]
