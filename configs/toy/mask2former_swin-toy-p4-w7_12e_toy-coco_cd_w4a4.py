# W4A4 RepQ-ViT post-training quantization of the toy Mask2Former trained
# with CD, calibrated on 16 toy train images, next to float:
#   python tools/test.py configs/toy/mask2former_swin-toy-p4-w7_12e_toy-coco_cd_w4a4.py CKPT
_base_ = './mask2former_swin-toy-p4-w7_12e_toy-coco_cd.py'
custom_hooks = [
    dict(type='PostTrainingQuantHook', w_bits=4, a_bits=4,
         method='repq-vit', calib=dict(num_images=16), compare_fp=True)
]
