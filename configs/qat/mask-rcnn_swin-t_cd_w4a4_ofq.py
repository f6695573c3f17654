# W4A4 quantization-aware training (OFQ: StatsQ weights, LSQ+ activations,
# query-key reparameterization, confidence-guided annealing over the last
# 10% of iterations) of Mask R-CNN Swin-T trained with Colinearity Decay.
# CD stays on during QAT (the optim wrapper is inherited;
# mask-rcnn_swin-t_w4a4_ofq.py is the same QAT without CD).
#   python tools/train.py configs/qat/mask-rcnn_swin-t_cd_w4a4_ofq.py \
#       --cfg-options load_from=work_dirs/mask-rcnn_swin-t_cd/epoch_12.pth
# The quantizers start from a RepQ-ViT calibration on 32 train images; the
# schedule is the inherited 1x one (an untuned starting point).
_base_ = ['../cd/mask-rcnn_swin-t_cd.py', '../_base_/qat/ofq_hooks.py']
load_from = 'work_dirs/mask-rcnn_swin-t_cd/epoch_12.pth'
model = dict(
    _delete_=True,
    type='QATDetector',
    detector={{_base_.model}},
    qat=dict(w_bits=4, a_bits=4, method='ofq', init='repq-vit'))
# the learned quantizer steps and offsets get no weight decay
optim_wrapper = dict(paramwise_cfg=dict(
    custom_keys={'quantizer.': dict(decay_mult=0.)}))
