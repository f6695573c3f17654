# The toy ViTDet schedule: 384 iterations (as the toy Swin's 12 epochs),
# warm-up 50, lr steps at 288 and 352, validation at the end; ViTDet's AdamW
# with layer-wise lr decay at lr 4e-4 (from scratch on a small set).
max_iters = 384
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=50),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_iters,
        by_epoch=False,
        milestones=[288, 352],
        gamma=0.1)
]
optim_wrapper = dict(
    type='OptimWrapper',
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(decay_rate=0.7),
    optimizer=dict(type='AdamW', lr=4e-4, betas=(0.9, 0.999),
                   weight_decay=0.1))
auto_scale_lr = dict(base_batch_size=64)
