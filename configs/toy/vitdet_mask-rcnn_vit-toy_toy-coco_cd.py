# CPU-sized ViTDet Mask R-CNN with Colinearity Decay: inherits the real
# ViT-B CD config and shrinks backbone (64 dims, 4 blocks, 2 heads, window 4,
# block 3 global), neck and heads, image size (256 LSJ-style fixed pad) and
# schedule; data is the embedded toy COCO set (same block as the toy Swin
# config: MMEngine configs cannot inherit two bases that both define data).
_base_ = '../cd/vitdet_mask-rcnn_vit-b_cd.py'

image_size = (256, 256)
embed_dims = 64
channels = 64
num_classes = 4
model = dict(
    data_preprocessor=dict(batch_augments=[
        dict(type='BatchFixedSizePad', size=image_size, pad_mask=True)
    ]),
    backbone=dict(
        img_size=image_size[0],
        embed_dims=embed_dims,
        depth=4,
        num_heads=2,
        window_size=4,
        global_attn_indexes=(3, ),
        drop_path_rate=0.0),
    neck=dict(in_channels=embed_dims, out_channels=channels),
    rpn_head=dict(in_channels=channels, feat_channels=channels),
    roi_head=dict(
        bbox_roi_extractor=dict(
            roi_layer=dict(sampling_ratio=2), out_channels=channels),
        # 4conv1fc as in ViTDet, 32-channel convs: its convs over 256 RoIs
        # dominate a CPU step at 64 channels
        bbox_head=dict(
            in_channels=channels,
            conv_out_channels=32,
            fc_out_channels=128,
            norm_cfg=dict(type='GN', num_groups=8, requires_grad=True),
            num_classes=num_classes),
        mask_roi_extractor=dict(
            roi_layer=dict(sampling_ratio=2), out_channels=channels),
        mask_head=dict(
            num_convs=2,
            in_channels=channels,
            conv_out_channels=channels,
            norm_cfg=dict(type='GN', num_groups=8, requires_grad=True),
            num_classes=num_classes)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=128)),
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=300),
        rcnn=dict(max_per_img=50)))

# ---- data: the embedded toy COCO set ----
data_root = 'data/toy_coco/'
metainfo = dict(
    classes=('circle', 'square', 'triangle', 'star'),
    palette=[(220, 20, 60), (119, 11, 32), (0, 0, 142), (0, 60, 100)])
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='PackDetInputs')
]
# No fixed-size Pad at test time: mmdet 3.3's Pad makes img_shape the padded
# size, so boxes may land in the padding and break mask pasting; the data
# preprocessor pads to a multiple of 32 instead.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    batch_size=2,
    num_workers=1,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=1,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# ---- schedule: 384 iterations, as the toy Swin's 12 epochs ----
max_iters = 384
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=50),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_iters,
        by_epoch=False,
        milestones=[288, 352],
        gamma=0.1)
]
optim_wrapper = dict(optimizer=dict(lr=4e-4), cd=dict(strength=2.0))
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=128, max_keep_ckpts=2))
log_processor = dict(window_size=10)
randomness = dict(seed=0)
