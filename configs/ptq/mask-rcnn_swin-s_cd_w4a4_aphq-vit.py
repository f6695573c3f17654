# W4A4 APHQ-ViT post-training quantization of Mask R-CNN Swin-S, with Colinearity
# Decay: as configs/ptq/mask-rcnn_swin-t_cd_w4a4_aphq-vit.py (APHQ-ViT's detection
# settings: calibration on 1 train image, reconstruction on 256, 20000 iterations per
# unit: GPU-hours), so quantize once and evaluate the saved model:
#   python tools/quantize.py configs/ptq/mask-rcnn_swin-s_cd_w4a4_aphq-vit.py CKPT --out q.pth
#   python tools/test.py configs/ptq/mask-rcnn_swin-s_cd_w4a4_aphq-vit.py CKPT --quant-checkpoint q.pth
_base_ = '../cd/mask-rcnn_swin-s_cd.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
custom_hooks = [
    dict(type='PostTrainingQuantHook', w_bits=4, a_bits=4, method='aphq-vit',
         calib=dict(num_images=1), reconstruction=dict(num_images=256))
]
