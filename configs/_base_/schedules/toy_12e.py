# The toy Swin schedule: 12 epochs of the toy set (32 iterations each at
# batch 2), warm-up 50 iterations, lr steps at epochs 9 and 11, validation at
# the end; Swin's AdamW recipe (mmdet's swin config: no decay on norms and
# position tables) at lr 4e-4, since the toy trains from scratch on a small
# set (the COCO configs fine-tune a pretrained backbone at 1e-4).
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[9, 11],
        gamma=0.1)
]
optim_wrapper = dict(
    type='OptimWrapper',
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }),
    optimizer=dict(
        _delete_=True,
        type='AdamW',
        lr=4e-4,
        betas=(0.9, 0.999),
        weight_decay=0.05))
