# W6A6 RepQ-ViT post-training quantization of Cascade Mask R-CNN Swin-T, with Colinearity Decay.
#   python tools/test.py configs/ptq/cascade-mask-rcnn_swin-t_cd_w6a6_repq-vit.py CHECKPOINT
# Calibration: 32 train images without augmentation; method='dopq-vit' or
# 'minmax' (or tools/test.py --quant-method) selects the other methods.
_base_ = '../cd/cascade-mask-rcnn_swin-t_cd.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
custom_hooks = [
    dict(type='PostTrainingQuantHook', w_bits=6, a_bits=6,
         method='repq-vit', calib=dict(num_images=32))
]
