"""Every shipped config loads; the real COCO configs build their model and
optim wrapper, and CD finds its 36 pairs in Swin-T and ViT-B."""
import glob
import os.path as osp

import mmdet
import pytest
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

from conftest import REPO

ALL_FILES = sorted(glob.glob(osp.join(REPO, 'configs', '**', '*.py'),
                            recursive=True))
#: parts composed by the configs (model, data, schedule, runtime files)
BASES = [p for p in ALL_FILES if '_base_' in p or 'lsj-100e' in p]
CONFIGS = [p for p in ALL_FILES if p not in BASES]
MMDET_SWIN = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', 'swin',
                      'mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py')


@pytest.mark.parametrize('path', CONFIGS,
                         ids=[osp.relpath(p, REPO) for p in CONFIGS])
def test_config_loads(path):
    cfg = Config.fromfile(path)
    detector = cfg.model.detector if cfg.model.type == 'QATDetector' \
        else cfg.model
    assert detector.type == 'MaskRCNN'
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'


@pytest.mark.parametrize('path', BASES,
                         ids=[osp.relpath(p, REPO) for p in BASES])
def test_base_loads(path):
    assert Config.fromfile(path)


def without_scope(value):
    """A config dict without the ``_scope_`` keys ``mmdet::`` bases add."""
    if isinstance(value, dict):
        return {k: without_scope(v) for k, v in value.items()
                if k != '_scope_'}
    if isinstance(value, (list, tuple)):
        return type(value)(without_scope(v) for v in value)
    return value


def test_composed_toy_swin_keeps_the_real_swin_t_recipe():
    """The toy composes our Swin-T model file, not mmdet's whole config: the
    model file is mmdet's model, the toy's optimizer mmdet's but the lr."""
    mmdet_swin = Config.fromfile(MMDET_SWIN)
    model = Config.fromfile(osp.join(
        REPO, 'configs/_base_/models/mask-rcnn_swin-t-p4-w7_fpn.py')).model
    assert without_scope(model.to_dict()) == without_scope(
        mmdet_swin.model.to_dict())
    toy = Config.fromfile(osp.join(
        REPO, 'configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py'))
    optimizer = dict(toy.optim_wrapper.to_dict(), optimizer=dict(
        toy.optim_wrapper.optimizer.to_dict(), lr=1e-4))
    assert without_scope(optimizer) == without_scope(
        mmdet_swin.optim_wrapper.to_dict())
    assert toy.train_dataloader.dataset.data_root == 'data/toy_coco/'


@pytest.mark.parametrize('name,backbone', [
    ('cd/mask-rcnn_swin-t_cd.py', 'SwinTransformer'),
    ('cd/vitdet_mask-rcnn_vit-b_cd.py', 'ViTDet'),
])
def test_real_cd_configs_build(name, backbone):
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(REPO, 'configs', name))
    cfg.model.backbone.init_cfg = None  # no download
    model = MODELS.build(cfg.model)
    assert type(model.backbone).__name__ == backbone
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    wrapper.bind_model(model)
    assert type(wrapper).__name__ == 'ColinearityDecayOptimWrapper'
    assert len(wrapper.matrix_pairs) == 36


@pytest.mark.parametrize('name,attentions', [
    ('qat/mask-rcnn_swin-t_cd_w4a4_ofq.py', 12),
    ('qat/vitdet_mask-rcnn_vit-b_cd_w4a4_ofq.py', 12),
])
def test_real_qat_configs_convert(name, attentions):
    from mmcd.engine.hooks import QuantAwareTrainingHook
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(REPO, 'configs', name))
    cfg.model.detector.backbone.init_cfg = None  # no download
    model = MODELS.build(cfg.model)  # QATDetector: converted when built
    assert model.qat_config.qk_reparam == bool(attentions)
    assert sum(getattr(m, 'qk_reparam', None) is not None
               for m in model.modules()) == attentions
    hook_cfg = dict(cfg.custom_hooks[0])
    assert hook_cfg.pop('type') == 'QuantAwareTrainingHook'
    QuantAwareTrainingHook(**hook_cfg)
    assert cfg.load_from.endswith('.pth')
