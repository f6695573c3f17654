# CPU-sized ViTDet Mask R-CNN with Colinearity Decay on the toy COCO set,
# composed as mmdet composes its configs: the real ViTDet ViT-B model, the
# toy data, the toy ViTDet schedule (layer-wise lr decay) and runtime; the
# backbone (64 dims, 4 blocks, 2 heads, window 4, block 3 global), neck,
# heads and image size (256, fixed-size batch padding) shrink.
_base_ = [
    '../_base_/models/vitdet_mask-rcnn_vit-b.py',
    '../_base_/datasets/toy-coco_instance.py',
    '../_base_/schedules/toy_384iter_layer-decay.py',
    '../_base_/toy_runtime.py'
]
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)

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

optim_wrapper = dict(type='ColinearityDecayOptimWrapper', cd=dict(strength=2.0))
# iteration-based, as ViTDet's LSJ schedule
train_dataloader = dict(sampler=dict(type='InfiniteSampler', shuffle=True))
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=128))
log_processor = dict(by_epoch=False)
