# Cascade Mask R-CNN Swin-T as the Swin Transformer repository builds it
# (SwinTransformer/Swin-Transformer-Object-Detection,
# configs/swin/cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_
# giou_4conv1f_adamw_3x_coco.py, the model of the RepQ-ViT / APHQ-ViT tables),
# on mmdet's Cascade Mask R-CNN model base: the Swin-T backbone of mmdet's own
# Swin configs, and three ConvFCBBoxHeads with 4 shared convolutions and 1 FC
# (SyncBN, GIoU loss on decoded boxes, class-specific regression) instead of
# the base's Shared2FCBBoxHeads. RPN, RoI extractors, mask head, assigners,
# samplers and test settings are the base's, equal to the Swin repository's
# (tests/test_configs.py checks the resolved model against it).
_base_ = 'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py'

pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth'  # noqa


def _bbox_head(target_stds):
    return dict(
        type='ConvFCBBoxHead',
        num_shared_convs=4,
        num_shared_fcs=1,
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=80,
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0., 0., 0., 0.],
            target_stds=target_stds),
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        loss_cls=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


model = dict(
    backbone=dict(
        _delete_=True,
        type='SwinTransformer',
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        convert_weights=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]),
    roi_head=dict(bbox_head=[
        _bbox_head([0.1, 0.1, 0.2, 0.2]),
        _bbox_head([0.05, 0.05, 0.1, 0.1]),
        _bbox_head([0.033, 0.033, 0.067, 0.067])
    ]))
