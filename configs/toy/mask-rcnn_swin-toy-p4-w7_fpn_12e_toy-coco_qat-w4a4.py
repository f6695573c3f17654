# W4A4 OFQ quantization-aware fine-tuning of the toy Swin Mask R-CNN trained
# without CD (the comparison for ..._cd_qat-w4a4.py): 2 epochs at the final
# lr of the toy schedule, calibration on 16 toy train images, annealing over
# the last quarter.
#   python tools/train.py configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py
#   python tools/train.py configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_qat-w4a4.py
_base_ = './mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
load_from = 'work_dirs/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco/epoch_12.pth'
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
