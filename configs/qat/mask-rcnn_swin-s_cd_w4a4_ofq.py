# W4A4 quantization-aware training (OFQ) of Mask R-CNN Swin-S trained with
# Colinearity Decay, as configs/qat/mask-rcnn_swin-t_cd_w4a4_ofq.py: CD stays on,
# quantizers start from a RepQ-ViT calibration on 32 train images, the schedule
# is the inherited 36-epoch one (an untuned starting point; shorten it
# with --cfg-options train_cfg.max_epochs=N).
#   python tools/train.py configs/qat/mask-rcnn_swin-s_cd_w4a4_ofq.py \
#       --cfg-options load_from=work_dirs/mask-rcnn_swin-s_cd/epoch_36.pth
_base_ = ['../cd/mask-rcnn_swin-s_cd.py', '../_base_/qat/ofq_hooks.py']
load_from = 'work_dirs/mask-rcnn_swin-s_cd/epoch_36.pth'
model = dict(
    _delete_=True,
    type='QATDetector',
    detector={{_base_.model}},
    qat=dict(w_bits=4, a_bits=4, method='ofq', init='repq-vit'))
# the learned quantizer steps and offsets get no weight decay
optim_wrapper = dict(paramwise_cfg=dict(
    custom_keys={'quantizer.': dict(decay_mult=0.)}))
