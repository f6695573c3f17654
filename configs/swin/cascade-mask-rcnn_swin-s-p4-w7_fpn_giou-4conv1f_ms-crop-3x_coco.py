# Cascade Mask R-CNN Swin-S, the Swin repository's 3x recipe
# (cascade_mask_rcnn_swin_small_patch4_window7_mstrain_480-800_giou_4conv1f_
# adamw_3x_coco.py; 51.9 box / 45.0 mask AP): the Swin-T config with Swin-S's
# depths and ImageNet-1k weights.
_base_ = './cascade-mask-rcnn_swin-t-p4-w7_fpn_giou-4conv1f_ms-crop-3x_coco.py'
pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_small_patch4_window7_224.pth'  # noqa
model = dict(
    backbone=dict(
        depths=[2, 2, 18, 2],
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
