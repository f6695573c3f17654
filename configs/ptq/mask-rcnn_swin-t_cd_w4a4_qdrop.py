# W4A4 QDrop post-training quantization of Mask R-CNN Swin-T, with Colinearity Decay:
# uniform quantizers calibrated on 32 train images, then block reconstruction
# (AdaRound, learned steps, QDrop's dropping; 20000 iterations per unit):
#   python tools/quantize.py configs/ptq/mask-rcnn_swin-t_cd_w4a4_qdrop.py CKPT --out q.pth
#   python tools/test.py configs/ptq/mask-rcnn_swin-t_cd_w4a4_qdrop.py CKPT --quant-checkpoint q.pth
_base_ = '../cd/mask-rcnn_swin-t_cd.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
custom_hooks = [
    dict(type='PostTrainingQuantHook', w_bits=4, a_bits=4, method='qdrop',
         calib=dict(num_images=32))
]
