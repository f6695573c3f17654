# W4A4 LSQ quantization-aware training (learnable weight and activation
# steps, no query-key reparameterization, no annealing) of Mask R-CNN Swin-T
# trained with CD: the common QAT baseline to compare OFQ with.
_base_ = './mask-rcnn_swin-t_cd_w4a4_ofq.py'
model = dict(qat=dict(method='lsq'))
custom_hooks = [  # no annealing: LSQ as published
    dict(type='QuantAwareTrainingHook', calib=dict(num_images=32)),
    dict(type='QuantOscillationHook', window=50)
]
