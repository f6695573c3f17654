"""Every shipped config loads; the real COCO configs build their model and
optim wrapper, and CD finds its pairs (36 in Swin-T and ViT-B, 72 in
Swin-S, and those of the transformer layers of Mask2Former and DINO); the
Cascade Mask R-CNN Swin configs are the Swin repository's recipe."""
import glob
import os.path as osp

import mmdet
import pytest
import torch
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
    assert detector.type in ('MaskRCNN', 'CascadeRCNN', 'Mask2Former', 'DINO')
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


@pytest.mark.parametrize('name,backbone,pairs', [
    ('cd/mask-rcnn_swin-t_cd.py', 'SwinTransformer', 36),
    ('cd/vitdet_mask-rcnn_vit-b_cd.py', 'ViTDet', 36),
    ('cd/cascade-mask-rcnn_swin-t_cd.py', 'SwinTransformer', 36),
    ('cd/cascade-mask-rcnn_swin-s_cd.py', 'SwinTransformer', 72),
    # 36 in Swin-T, 6 pixel-decoder FFNs, 9 decoder layers x (FFN, self-
    # and cross-attention vo and qk)
    ('cd/mask2former_swin-t_cd.py', 'SwinTransformer', 36 + 6 + 9 * 5),
    ('cd/mask2former_swin-s_cd.py', 'SwinTransformer', 72 + 6 + 9 * 5),
    # the panoptic model: the same decoder, stuff classes added
    ('cd/mask2former_swin-t_coco-panoptic_cd.py', 'SwinTransformer',
     36 + 6 + 9 * 5),
    # 72 in Swin-L, 6 encoder FFNs, 6 decoder layers x (FFN, self-attention
    # vo and qk); deformable attention has no pair
    ('cd/dino-5scale_swin-l_cd.py', 'SwinTransformer', 72 + 6 + 6 * 3),
])
def test_real_cd_configs_build(name, backbone, pairs):
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(REPO, 'configs', name))
    cfg.model.backbone.init_cfg = None  # no download
    model = MODELS.build(cfg.model)
    assert type(model.backbone).__name__ == backbone
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    wrapper.bind_model(model)
    assert type(wrapper).__name__ == 'ColinearityDecayOptimWrapper'
    assert len(wrapper.matrix_pairs) == pairs


def test_swin_s_cd_config_keeps_mmdets_amp():
    """mmdet's Swin-S 3x config trains with AMP: the CD config keeps it
    (AmpOptimWrapper needs a GPU: its pairs are counted with the plain
    wrapper here; CUDA tests run the AMP wrapper)."""
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(REPO, 'configs/cd/mask-rcnn_swin-s_cd.py'))
    assert cfg.optim_wrapper.type == 'ColinearityDecayAmpOptimWrapper'
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, dict(
        cfg.optim_wrapper, type='ColinearityDecayOptimWrapper'))
    wrapper.bind_model(model)
    assert len(wrapper.matrix_pairs) == 72  # 24 blocks x (ffn, vo, qk)


#: The Swin repository's Cascade Mask R-CNN Swin-T 3x recipe
#: (SwinTransformer/Swin-Transformer-Object-Detection, configs/swin/cascade_
#: mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_
#: coco.py and configs/_base_/models/cascade_mask_rcnn_swin_fpn.py),
#: transcribed by hand in mmdet 3's names (embed_dim -> embed_dims,
#: use_checkpoint -> with_cp; rpn_proposal's nms_post is gone in mmdet 3).
SWIN_REPO_CASCADE_T = dict(
    backbone=dict(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                  window_size=7, mlp_ratio=4, qkv_bias=True, qk_scale=None,
                  drop_rate=0., attn_drop_rate=0., drop_path_rate=0.2,
                  patch_norm=True, out_indices=(0, 1, 2, 3), with_cp=False),
    neck=dict(type='FPN', in_channels=[96, 192, 384, 768], out_channels=256,
              num_outs=5),
    stage_loss_weights=[1, 0.5, 0.25],
    target_stds=[[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1],
                 [0.033, 0.033, 0.067, 0.067]],
    rcnn_ious=[0.5, 0.6, 0.7],
    rpn_proposal=dict(nms_pre=2000, max_per_img=2000,
                      nms=dict(type='nms', iou_threshold=0.7),
                      min_bbox_size=0),
    test_cfg=dict(
        rpn=dict(nms_pre=1000, max_per_img=1000,
                 nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5),
                  max_per_img=100, mask_thr_binary=0.5)),
    mask_head=dict(type='FCNMaskHead', num_convs=4, in_channels=256,
                   conv_out_channels=256, num_classes=80),
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999),
                   weight_decay=0.05),
    custom_keys={'absolute_pos_embed': dict(decay_mult=0.),
                 'relative_position_bias_table': dict(decay_mult=0.),
                 'norm': dict(decay_mult=0.)},
    max_epochs=36, milestones=[27, 33], warmup_iters=500,
    warmup_ratio=0.001)


def swin_repo_bbox_head(target_stds):
    return dict(
        type='ConvFCBBoxHead', num_shared_convs=4, num_shared_fcs=1,
        in_channels=256, conv_out_channels=256, fc_out_channels=1024,
        roi_feat_size=7, num_classes=80,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder',
                        target_means=[0., 0., 0., 0.],
                        target_stds=target_stds),
        reg_class_agnostic=False, reg_decoded_bbox=True,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False,
                      loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


@pytest.mark.parametrize('size,depths', [('t', [2, 2, 6, 2]),
                                         ('s', [2, 2, 18, 2])])
def test_cascade_swin_configs_are_the_swin_repository_recipe(size, depths):
    ref = SWIN_REPO_CASCADE_T
    cfg = Config.fromfile(osp.join(
        REPO, f'configs/swin/cascade-mask-rcnn_swin-{size}-p4-w7_fpn_'
        'giou-4conv1f_ms-crop-3x_coco.py'))
    model = without_scope(cfg.model.to_dict())
    assert model['type'] == 'CascadeRCNN'
    backbone = model['backbone']
    assert backbone['type'] == 'SwinTransformer'
    assert {k: backbone[k] for k in ref['backbone']} == dict(
        ref['backbone'], depths=depths)
    assert backbone['init_cfg']['checkpoint'].endswith(
        f'swin_{dict(t="tiny", s="small")[size]}_patch4_window7_224.pth')
    assert model['neck'] == ref['neck']
    roi_head = model['roi_head']
    assert roi_head['type'] == 'CascadeRoIHead' and roi_head[
        'num_stages'] == 3
    assert roi_head['stage_loss_weights'] == ref['stage_loss_weights']
    assert roi_head['bbox_head'] == [swin_repo_bbox_head(stds)
                                     for stds in ref['target_stds']]
    assert {k: roi_head['mask_head'][k] for k in ref['mask_head']} == \
        ref['mask_head']
    assert roi_head['bbox_roi_extractor']['roi_layer'] == dict(
        type='RoIAlign', output_size=7, sampling_ratio=0)
    assert roi_head['mask_roi_extractor']['roi_layer'] == dict(
        type='RoIAlign', output_size=14, sampling_ratio=0)
    rcnn = model['train_cfg']['rcnn']
    assert [(s['assigner']['pos_iou_thr'], s['assigner']['neg_iou_thr'],
             s['assigner']['min_pos_iou'], s['sampler']['num'],
             s['mask_size']) for s in rcnn] == [
                 (iou, iou, iou, 512, 28) for iou in ref['rcnn_ious']]
    assert model['train_cfg']['rpn_proposal'] == ref['rpn_proposal']
    assert model['test_cfg'] == ref['test_cfg']
    # AdamW, no decay on norms and position tables, 36 epochs, steps 27/33,
    # linear warmup over 500 iterations from 0.001
    assert cfg.optim_wrapper.optimizer.to_dict() == ref['optimizer']
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys.to_dict() == \
        ref['custom_keys']
    assert cfg.train_cfg.max_epochs == ref['max_epochs']
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end, warmup.by_epoch) \
        == ('LinearLR', ref['warmup_ratio'], ref['warmup_iters'], False)
    assert (steps.type, steps.milestones, steps.gamma, steps.end) == (
        'MultiStepLR', ref['milestones'], 0.1, ref['max_epochs'])
    # the multi-scale + crop augmentation: mmdet's port of the same recipe
    mmdet_3x = Config.fromfile(MMDET_SWIN.replace('1x_coco',
                                                  'ms-crop-3x_coco'))
    assert without_scope(cfg.train_pipeline) == without_scope(
        mmdet_3x.train_pipeline)
    assert without_scope(cfg.train_dataloader.to_dict()) == without_scope(
        mmdet_3x.train_dataloader.to_dict())


@pytest.mark.parametrize('model_file,mmdet_config', [
    ('mask2former_swin-t-p4-w7_instance.py',
     'mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco.py'),
    ('dino-5scale_swin-l.py', 'dino/dino-5scale_swin-l_8xb2-12e_coco.py'),
])
def test_query_based_model_files_are_mmdets_models(model_file, mmdet_config):
    """mmdet has no model-only file for Mask2Former and DINO: ours restate
    the model of its config, which the toy configs compose with toy data."""
    ours = Config.fromfile(osp.join(REPO, 'configs/_base_/models',
                                    model_file)).model
    theirs = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim',
                                      'configs', mmdet_config)).model
    assert without_scope(ours.to_dict()) == without_scope(theirs.to_dict())


def test_toy_cascade_shrinks_only_the_sizes_of_the_real_heads():
    """The toy restates the three bbox heads and the rcnn stages (lists are
    replaced whole): apart from widths, classes and RoI counts they are the
    real model file's."""
    real = Config.fromfile(osp.join(
        REPO, 'configs/_base_/models/'
        'cascade-mask-rcnn_swin-t-p4-w7_fpn_giou-4conv1f.py')).model
    toy = Config.fromfile(osp.join(
        REPO, 'configs/toy/cascade-mask-rcnn_swin-toy-p4-w7_fpn_giou-'
        '4conv1f_12e_toy-coco_cd.py')).model
    sizes = dict(in_channels=64, conv_out_channels=64, fc_out_channels=128,
                 num_classes=4)
    assert [dict(h.to_dict(), **sizes) for h in real.roi_head.bbox_head] \
        == [h.to_dict() for h in toy.roi_head.bbox_head]
    assert [dict(s.to_dict(), sampler=dict(s.sampler, num=128))
            for s in real.train_cfg.rcnn] == [
                s.to_dict() for s in toy.train_cfg.rcnn]


@pytest.mark.parametrize('name,attentions', [
    ('qat/mask-rcnn_swin-t_cd_w4a4_ofq.py', 12),
    ('qat/cascade-mask-rcnn_swin-t_cd_w4a4_ofq.py', 12),
    ('qat/vitdet_mask-rcnn_vit-b_cd_w4a4_ofq.py', 12),
    ('qat/mask2former_swin-t_cd_w4a4_ofq.py', 12),
])
def test_real_qat_configs_convert(name, attentions):
    from mmcd.engine.hooks import QuantAwareTrainingHook
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(REPO, 'configs', name))
    cfg.model.detector.backbone.init_cfg = None  # no download
    model = MODELS.build(cfg.model)  # QATDetector: converted when built
    assert model.qat_config.qk_reparam == bool(attentions)
    # the float checkpoint of load_from has the converted model's keys
    float_keys = set(MODELS.build(cfg.model.detector).state_dict())
    assert float_keys <= set(model.state_dict())
    assert sum(getattr(m, 'qk_reparam', None) is not None
               for m in model.modules()) == attentions
    hook_cfg = dict(cfg.custom_hooks[0])
    assert hook_cfg.pop('type') == 'QuantAwareTrainingHook'
    QuantAwareTrainingHook(**hook_cfg)
    assert cfg.load_from.endswith('.pth')


def test_panoptic_mask2former_ptq_config_quantizes_its_attention():
    """The panoptic Mask2Former comes for free: its PTQ config's model
    (real Swin-T size, a 128 px random image; no panoptic toy data) has
    every nn.MultiheadAttention of the float model replaced by the twin,
    and the quantized model still predicts a panoptic map of the image's
    size next to the instances."""
    from mmdet.structures import DetDataSample

    from mmcd.core.quant import QuantConfig, QuantMultiheadAttention
    from mmcd.engine import quantize_copy
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(
        REPO, 'configs/ptq/mask2former_swin-t_coco-panoptic_cd_w4a4_'
        'repq-vit.py'))
    cfg.model.backbone.init_cfg = None
    cfg.model.data_preprocessor.batch_augments = None  # 1024 px padding
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    attentions = sum(isinstance(m, torch.nn.MultiheadAttention)
                     for m in model.modules())
    assert attentions == 9 * 2  # decoder layers x (self, cross)
    sample = DetDataSample(metainfo=dict(
        img_shape=(128, 128), ori_shape=(128, 128), scale_factor=(1., 1.),
        pad_shape=(128, 128), batch_input_shape=(128, 128)))
    batch = dict(inputs=[torch.randint(0, 256, (3, 128, 128)).float()],
                 data_samples=[sample])
    hook = cfg.custom_hooks[0]
    quantized = quantize_copy(
        model, QuantConfig(hook.w_bits, hook.a_bits, hook.method), batch)
    assert sum(isinstance(m, QuantMultiheadAttention)
               for m in quantized.modules()) == attentions
    with torch.no_grad():
        result, = quantized.test_step(batch)
    assert result.pred_panoptic_seg.sem_seg.shape == (1, 128, 128)
    assert 'pred_instances' in result
