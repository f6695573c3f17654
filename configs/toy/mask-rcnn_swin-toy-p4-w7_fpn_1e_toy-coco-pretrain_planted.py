# A PLANTED model of the outlier mechanism CD targets (docs/experiment/
# planted.md): the toy pretraining continued for 1 epoch (512 iterations at
# lr 1e-4) with `alignment_growth`, CD's update with the opposite sign,
# through the 2 most aligned inner channels of every pair, so that a few
# channels carry large activations. Start from the pretraining's last
# checkpoint (python tools/train.py
# configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_8e_toy-coco-pretrain.py).
# Results on a model made this way are results on a planted model.
# The strength is still being calibrated (issue 30): this one keeps the
# float AP but plants smaller outliers than the target.
_base_ = './mask-rcnn_swin-toy-p4-w7_fpn_8e_toy-coco-pretrain.py'

load_from = ('work_dirs/mask-rcnn_swin-toy-p4-w7_fpn_8e_toy-coco-pretrain/'
             'epoch_8.pth')
max_epochs = 1
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50)
]
optim_wrapper = dict(
    type='ColinearityDecayOptimWrapper',
    optimizer=dict(lr=1e-4),
    regularizers=[dict(type='alignment_growth', strength=30.0, channels=2)])
