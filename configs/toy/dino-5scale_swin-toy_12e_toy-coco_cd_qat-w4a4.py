# W4A4 OFQ quantization-aware fine-tuning of the toy DINO trained with
# CD, CD kept on, with the QAT settings of the toy Mask R-CNN's
# ..._qat-w4a4.py (2 epochs at lr 4e-5, calibration on 16 toy train
# images, annealing over the last quarter). The backbone's window attention
# and the decoder's nn.MultiheadAttention self-attention train quantized;
# multi-scale deformable sampling stays float.
#   python tools/train.py configs/toy/dino-5scale_swin-toy_12e_toy-coco_cd.py
#   python tools/train.py configs/toy/dino-5scale_swin-toy_12e_toy-coco_cd_qat-w4a4.py
_base_ = './dino-5scale_swin-toy_12e_toy-coco_cd.py'
load_from = 'work_dirs/dino-5scale_swin-toy_12e_toy-coco_cd/epoch_12.pth'
max_epochs = 2
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = []
model = dict(
    _delete_=True,
    type='QATDetector',
    detector={{_base_.model}},
    qat=dict(w_bits=4, a_bits=4, method='ofq', init='repq-vit'))
# the learned quantizer steps and offsets get no weight decay
optim_wrapper = dict(
    optimizer=dict(lr=4e-5),
    paramwise_cfg=dict(custom_keys={'quantizer.': dict(decay_mult=0.)}))
default_hooks = dict(checkpoint=dict(interval=1))
custom_hooks = [
    dict(type='QuantAwareTrainingHook', calib=dict(num_images=16)),
    dict(type='ConfidenceGuidedAnnealingHook', begin=0.75),
    dict(type='QuantOscillationHook', window=8)
]
