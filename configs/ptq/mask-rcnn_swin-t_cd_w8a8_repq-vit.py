# W8A8 RepQ-ViT post-training quantization of Mask R-CNN Swin-T, with Colinearity Decay.
#   python tools/test.py configs/ptq/mask-rcnn_swin-t_cd_w8a8_repq-vit.py CHECKPOINT
# Calibration: 32 train images without augmentation; method='dopq-vit' or
# 'minmax' selects the other methods.
_base_ = '../cd/mask-rcnn_swin-t_cd.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
custom_hooks = [
    dict(type='PostTrainingQuantHook', w_bits=8, a_bits=8,
         method='repq-vit', calib=dict(num_images=32))
]
