# W4A4 OFQ quantization-aware training of the baseline Mask R-CNN Swin-T
# (no CD), the comparison for mask-rcnn_swin-t_cd_w4a4_ofq.py.
#   python tools/train.py configs/qat/mask-rcnn_swin-t_w4a4_ofq.py \
#       --cfg-options load_from=work_dirs/mask-rcnn_swin-t-p4-w7_fpn_1x_coco/epoch_12.pth
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
          '../_base_/qat/ofq_hooks.py']
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
load_from = 'work_dirs/mask-rcnn_swin-t-p4-w7_fpn_1x_coco/epoch_12.pth'
model = dict(
    _delete_=True,
    type='QATDetector',
    detector={{_base_.model}},
    qat=dict(w_bits=4, a_bits=4, method='ofq', init='repq-vit'))
# the learned quantizer steps and offsets get no weight decay
optim_wrapper = dict(paramwise_cfg=dict(
    custom_keys={'quantizer.': dict(decay_mult=0.)}))
