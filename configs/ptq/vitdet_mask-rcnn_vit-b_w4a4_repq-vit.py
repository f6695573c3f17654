# W4A4 RepQ-ViT post-training quantization of ViTDet Mask R-CNN ViT-B,
# baseline (no CD).
#   python tools/test.py configs/ptq/vitdet_mask-rcnn_vit-b_w4a4_repq-vit.py CHECKPOINT
_base_ = '../vitdet/vitdet_mask-rcnn_vit-b_100e_coco.py'
custom_hooks = [
    dict(type='PostTrainingQuantHook', w_bits=4, a_bits=4,
         method='repq-vit', calib=dict(num_images=32))
]
