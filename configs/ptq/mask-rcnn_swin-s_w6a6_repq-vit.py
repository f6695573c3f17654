# W6A6 RepQ-ViT post-training quantization of Mask R-CNN Swin-S, baseline (no CD).
#   python tools/test.py configs/ptq/mask-rcnn_swin-s_w6a6_repq-vit.py CHECKPOINT
# Calibration: 32 train images without augmentation; method='dopq-vit' or
# 'minmax' (or tools/test.py --quant-method) selects the other methods.
_base_ = 'mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
custom_hooks = [
    dict(type='PostTrainingQuantHook', w_bits=6, a_bits=6,
         method='repq-vit', calib=dict(num_images=32))
]
