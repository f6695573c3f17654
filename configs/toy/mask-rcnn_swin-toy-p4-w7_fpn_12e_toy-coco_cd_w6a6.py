# W6A6 RepQ-ViT post-training quantization of the toy Swin Mask R-CNN
# trained with CD, calibrated on 16 toy train images:
#   python tools/test.py configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd_w6a6.py CKPT
_base_ = './mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd.py'
custom_hooks = [
    dict(type='PostTrainingQuantHook', w_bits=6, a_bits=6,
         method='repq-vit', calib=dict(num_images=16), compare_fp=True)
]
