# W4A4 RepQ-ViT post-training quantization of Mask2Former Swin-T (instance segmentation), baseline (no CD):
# the Swin backbone, the convolutions and Linears of the heads, both matmuls of
# every nn.MultiheadAttention; deformable attention's sampling stays float (the
# precision plan in the log lists what is quantized and what is not).
#   python tools/test.py configs/ptq/mask2former_swin-t_w4a4_repq-vit.py CHECKPOINT
_base_ = 'mmdet::mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
custom_hooks = [
    dict(type='PostTrainingQuantHook', w_bits=4, a_bits=4,
         method='repq-vit', calib=dict(num_images=32))
]
