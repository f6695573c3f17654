# W4A4 RepQ-ViT post-training quantization of Mask2Former Swin-T for COCO
# panoptic segmentation, with Colinearity Decay: quantized as the instance
# model (mask2former_swin-t_cd_w4a4_repq-vit.py); the table of the hook gives
# PQ / SQ / RQ and the instance box / mask mAP of mmdet's two evaluators.
#   python tools/test.py configs/ptq/mask2former_swin-t_coco-panoptic_cd_w4a4_repq-vit.py CHECKPOINT
_base_ = '../cd/mask2former_swin-t_coco-panoptic_cd.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
custom_hooks = [
    dict(type='PostTrainingQuantHook', w_bits=4, a_bits=4,
         method='repq-vit', calib=dict(num_images=32))
]
