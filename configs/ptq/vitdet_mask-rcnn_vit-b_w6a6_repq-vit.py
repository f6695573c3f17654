# W6A6 RepQ-ViT post-training quantization of ViTDet Mask R-CNN ViT-B,
# baseline (no CD).
#   python tools/test.py configs/ptq/vitdet_mask-rcnn_vit-b_w6a6_repq-vit.py CHECKPOINT
_base_ = '../vitdet/vitdet_mask-rcnn_vit-b_100e_coco.py'
custom_hooks = [
    dict(type='PostTrainingQuantHook', w_bits=6, a_bits=6,
         method='repq-vit', calib=dict(num_images=32))
]
