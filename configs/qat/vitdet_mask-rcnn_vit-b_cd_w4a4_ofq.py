# W4A4 OFQ quantization-aware training of ViTDet Mask R-CNN ViT-B trained
# with CD (layer-wise lr decay and CD inherited).
#   python tools/train.py configs/qat/vitdet_mask-rcnn_vit-b_cd_w4a4_ofq.py \
#       --cfg-options load_from=work_dirs/vitdet_mask-rcnn_vit-b_cd/iter_184375.pth
_base_ = ['../cd/vitdet_mask-rcnn_vit-b_cd.py', '../_base_/qat/ofq_hooks.py']
load_from = 'work_dirs/vitdet_mask-rcnn_vit-b_cd/iter_184375.pth'
# (layer-wise lr decay exempts the quantizers' 0-d/1-d steps from decay)
model = dict(
    _delete_=True,
    type='QATDetector',
    detector={{_base_.model}},
    qat=dict(w_bits=4, a_bits=4, method='ofq', init='repq-vit'))
