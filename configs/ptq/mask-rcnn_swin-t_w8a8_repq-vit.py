# W8A8 RepQ-ViT post-training quantization of Mask R-CNN Swin-T, baseline (no CD).
#   python tools/test.py configs/ptq/mask-rcnn_swin-t_w8a8_repq-vit.py CHECKPOINT
# Calibration: 32 train images without augmentation; method='dopq-vit' or
# 'minmax' selects the other methods.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
custom_hooks = [
    dict(type='PostTrainingQuantHook', w_bits=8, a_bits=8,
         method='repq-vit', calib=dict(num_images=32))
]
