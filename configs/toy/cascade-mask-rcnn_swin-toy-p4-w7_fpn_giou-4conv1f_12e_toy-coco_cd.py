# A CPU-sized Cascade Mask R-CNN (the Swin repository's recipe: three
# ConvFCBBoxHeads with 4 shared convolutions + 1 FC and the GIoU loss) with
# the toy Swin backbone, trained with Colinearity Decay on the toy COCO set:
# the real model file, the toy data, schedule and runtime, and only what must
# shrink overridden, as in mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py (the
# three heads are restated smaller: configs replace lists whole;
# tests/test_configs.py checks they differ from the real ones only there).
#   python tools/train.py configs/toy/cascade-mask-rcnn_swin-toy-p4-w7_fpn_giou-4conv1f_12e_toy-coco_cd.py
_base_ = [
    '../_base_/models/cascade-mask-rcnn_swin-t-p4-w7_fpn_giou-4conv1f.py',
    '../_base_/datasets/toy-coco_instance.py',
    '../_base_/schedules/toy_12e.py', '../_base_/toy_runtime.py'
]
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)

embed_dims = 32
fpn_channels = 64
num_classes = 4


def _toy_bbox_head(target_stds):
    return dict(
        type='ConvFCBBoxHead',
        num_shared_convs=4,
        num_shared_fcs=1,
        in_channels=fpn_channels,
        conv_out_channels=fpn_channels,
        fc_out_channels=128,
        roi_feat_size=7,
        num_classes=num_classes,
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


def _toy_rcnn_stage(iou):
    return dict(
        assigner=dict(
            type='MaxIoUAssigner',
            pos_iou_thr=iou,
            neg_iou_thr=iou,
            min_pos_iou=iou,
            match_low_quality=False,
            ignore_iof_thr=-1),
        sampler=dict(
            type='RandomSampler',
            num=128,
            pos_fraction=0.25,
            neg_pos_ub=-1,
            add_gt_as_proposals=True),
        mask_size=28,
        pos_weight=-1,
        debug=False)


model = dict(
    backbone=dict(
        embed_dims=embed_dims,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 4, 8],
        drop_path_rate=0.1,
        convert_weights=False,
        init_cfg=None),
    neck=dict(
        in_channels=[embed_dims * 2**i for i in range(4)],
        out_channels=fpn_channels),
    rpn_head=dict(in_channels=fpn_channels, feat_channels=fpn_channels),
    roi_head=dict(
        bbox_roi_extractor=dict(
            roi_layer=dict(sampling_ratio=2), out_channels=fpn_channels),
        bbox_head=[
            _toy_bbox_head([0.1, 0.1, 0.2, 0.2]),
            _toy_bbox_head([0.05, 0.05, 0.1, 0.1]),
            _toy_bbox_head([0.033, 0.033, 0.067, 0.067])
        ],
        mask_roi_extractor=dict(
            roi_layer=dict(sampling_ratio=2), out_channels=fpn_channels),
        mask_head=dict(
            num_convs=2,
            in_channels=fpn_channels,
            conv_out_channels=fpn_channels,
            num_classes=num_classes)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=128)),
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=[_toy_rcnn_stage(iou) for iou in (0.5, 0.6, 0.7)]),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=300),
        rcnn=dict(max_per_img=50)))
default_hooks = dict(checkpoint=dict(interval=4))  # epochs
optim_wrapper = dict(
    type='ColinearityDecayOptimWrapper', cd=dict(strength=2.0))
