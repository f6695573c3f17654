"""Every shipped config loads; the real COCO configs build their model and
optim wrapper, and CD finds its 36 pairs in Swin-T and ViT-B."""
import glob
import os.path as osp

import pytest
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

from conftest import REPO

CONFIGS = sorted(glob.glob(osp.join(REPO, 'configs', '**', '*.py'),
                           recursive=True))


@pytest.mark.parametrize('path', CONFIGS,
                         ids=[osp.relpath(p, REPO) for p in CONFIGS])
def test_config_loads(path):
    cfg = Config.fromfile(path)
    assert cfg.model.type == 'MaskRCNN'
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'


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
    from mmcd.core.quant import prepare_qat
    from mmcd.engine.hooks import QuantAwareTrainingHook
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(REPO, 'configs', name))
    cfg.model.backbone.init_cfg = None  # no download
    model = MODELS.build(cfg.model)
    hook_cfg = dict(cfg.custom_hooks[0])
    assert hook_cfg.pop('type') == 'QuantAwareTrainingHook'
    hook = QuantAwareTrainingHook(**hook_cfg)
    summary = prepare_qat(model, hook.qat_cfg)
    assert summary['qk_reparam'] == attentions
    assert cfg.load_from.endswith('.pth')
