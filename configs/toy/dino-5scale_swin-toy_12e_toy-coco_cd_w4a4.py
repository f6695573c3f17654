# W4A4 RepQ-ViT post-training quantization of the toy DINO trained with CD,
# calibrated on 16 toy train images, next to float:
#   python tools/test.py configs/toy/dino-5scale_swin-toy_12e_toy-coco_cd_w4a4.py CKPT
_base_ = './dino-5scale_swin-toy_12e_toy-coco_cd.py'
custom_hooks = [
    dict(type='PostTrainingQuantHook', w_bits=4, a_bits=4,
         method='repq-vit', calib=dict(num_images=16), compare_fp=True)
]
