# A CPU-sized Swin Mask R-CNN on the toy COCO set, composed as mmdet composes
# its configs: the real Swin-T Mask R-CNN model, the toy data, the toy
# schedule and runtime. Only what must shrink is overridden: backbone
# width/depth, neck and head widths, RoI counts, no pretrained init. 2.6M
# parameters; about 0.2 s/iter on 2 CPU cores at batch 2, 256 px.
_base_ = [
    '../_base_/models/mask-rcnn_swin-t-p4-w7_fpn.py',
    '../_base_/datasets/toy-coco_instance.py',
    '../_base_/schedules/toy_12e.py', '../_base_/toy_runtime.py'
]

embed_dims = 32
fpn_channels = 64
num_classes = 4
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
        # A fixed 2x2 RoIAlign sampling grid: the adaptive default (0) costs
        # half of a CPU step on large toy RoIs.
        bbox_roi_extractor=dict(
            roi_layer=dict(sampling_ratio=2), out_channels=fpn_channels),
        bbox_head=dict(
            in_channels=fpn_channels,
            fc_out_channels=128,
            num_classes=num_classes),
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
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=300),
        rcnn=dict(max_per_img=50)))
default_hooks = dict(checkpoint=dict(interval=4))  # epochs
