# Cascade Mask R-CNN Swin-T, 3x multi-scale schedule with crops: the Swin
# repository's recipe (cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_
# 480-800_giou_4conv1f_adamw_3x_coco.py; 50.4 box / 43.7 mask AP), the model
# of the RepQ-ViT / DopQ-ViT / APHQ-ViT tables, composed from mmdet's bases.
# Data augmentation and AdamW are those of mmdet's
# swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py, its port of the same
# recipe for Mask R-CNN (tests/test_configs.py checks they stay equal); the
# schedule is the Swin repository's: 36 epochs, steps at 27 and 33, linear
# warmup over 500 iterations (mmdet's port warms up over 1000). 16 images
# per batch (8 GPUs x 2). The Swin repository trained with apex mixed
# precision; this config trains in float32 like mmdet's ms-crop-3x (type=
# 'AmpOptimWrapper' in optim_wrapper for AMP).
_base_ = [
    '../_base_/models/cascade-mask-rcnn_swin-t-p4-w7_fpn_giou-4conv1f.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py'
]

# augmentation strategy originates from DETR / Sparse RCNN
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[[
            dict(
                type='RandomChoiceResize',
                scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333),
                        (608, 1333), (640, 1333), (672, 1333), (704, 1333),
                        (736, 1333), (768, 1333), (800, 1333)],
                keep_ratio=True)
        ],
                    [
                        dict(
                            type='RandomChoiceResize',
                            scales=[(400, 1333), (500, 1333), (600, 1333)],
                            keep_ratio=True),
                        dict(
                            type='RandomCrop',
                            crop_type='absolute_range',
                            crop_size=(384, 600),
                            allow_negative_crop=True),
                        dict(
                            type='RandomChoiceResize',
                            scales=[(480, 1333), (512, 1333), (544, 1333),
                                    (576, 1333), (608, 1333), (640, 1333),
                                    (672, 1333), (704, 1333), (736, 1333),
                                    (768, 1333), (800, 1333)],
                            keep_ratio=True)
                    ]]),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)

param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
        end=500),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[27, 33],
        gamma=0.1)
]

optim_wrapper = dict(
    type='OptimWrapper',
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }),
    optimizer=dict(
        _delete_=True,
        type='AdamW',
        lr=0.0001,
        betas=(0.9, 0.999),
        weight_decay=0.05))
