# W4A4 quantization-aware training (OFQ) of Mask2Former Swin-T (instance) trained with
# Colinearity Decay, as configs/qat/mask-rcnn_swin-t_cd_w4a4_ofq.py: CD stays
# on, quantizers start from a RepQ-ViT calibration on 32 train images, the
# schedule is the inherited 368,750-iteration LSJ one (an untuned starting point:
# shorten it with --cfg-options). The Swin backbone, the transformer layers'
# Linears and nn.MultiheadAttention (both products) train quantized;
# multi-scale deformable attention's sampling stays float.
#   python tools/train.py configs/qat/mask2former_swin-t_cd_w4a4_ofq.py \
#       --cfg-options load_from=work_dirs/mask2former_swin-t_cd/iter_368750.pth
_base_ = ['../cd/mask2former_swin-t_cd.py', '../_base_/qat/ofq_hooks.py']
load_from = 'work_dirs/mask2former_swin-t_cd/iter_368750.pth'
model = dict(
    _delete_=True,
    type='QATDetector',
    detector={{_base_.model}},
    qat=dict(w_bits=4, a_bits=4, method='ofq', init='repq-vit'))
# the learned quantizer steps and offsets get no weight decay
optim_wrapper = dict(paramwise_cfg=dict(
    custom_keys={'quantizer.': dict(decay_mult=0.)}))
