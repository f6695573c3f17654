# A CPU-sized DINO (5 feature levels) with the toy Swin backbone, trained with
# Colinearity Decay on the toy COCO set (boxes only): the real model file, the
# toy data, schedule and runtime, and only what must shrink overridden
# (backbone, layers, FFN widths, queries, denoising queries; the transformer
# keeps 256 channels: mmdet's DINO decoder encodes reference points with a
# fixed 128 features per coordinate, so embed_dims must be 256), and the
# images, 128 px instead of the toy's 256: on a CPU, mmcv's deformable
# attention runs its PyTorch fallback, 88% of a step, in proportion to the
# 5 levels' positions (5456 at 256 px, 1364 at 128 px). CD finds the
# backbone's pairs and those of the decoder's self-attention
# (nn.MultiheadAttention) and of every FFN; deformable attention has none.
#   python tools/train.py configs/toy/dino-5scale_swin-toy_12e_toy-coco_cd.py
_base_ = [
    '../_base_/models/dino-5scale_swin-l.py',
    '../_base_/datasets/toy-coco_instance.py',
    '../_base_/schedules/toy_12e.py', '../_base_/toy_runtime.py'
]
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)

embed_dims = 32
model = dict(
    num_queries=30,
    backbone=dict(
        pretrain_img_size=224,
        embed_dims=embed_dims,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 4, 8],
        window_size=7,
        drop_path_rate=0.1,
        with_cp=False,
        convert_weights=False,
        init_cfg=None),
    neck=dict(in_channels=[embed_dims * 2**i for i in range(4)]),
    encoder=dict(
        num_layers=2, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=256))),
    decoder=dict(
        num_layers=2, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=256))),
    bbox_head=dict(num_classes=4),
    dn_cfg=dict(group_cfg=dict(num_dn_queries=10)),
    test_cfg=dict(max_per_img=50))
img_scale = (128, 128)
# the toy set's pipelines at 128 px, boxes only
train_pipeline = _base_.train_pipeline
train_pipeline[1]['with_mask'] = False  # LoadAnnotations
train_pipeline[2]['scale'] = img_scale  # Resize
test_pipeline = _base_.test_pipeline
test_pipeline[1]['scale'] = img_scale  # Resize
test_pipeline[2]['with_mask'] = False  # LoadAnnotations
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(metric='bbox')
test_evaluator = val_evaluator
default_hooks = dict(checkpoint=dict(interval=4))  # epochs
# DINO's optimizer recipe (mmdet's DINO configs: AdamW, gradient norm clipped
# at 0.1) at half the toy Swin's from-scratch rate.
optim_wrapper = dict(
    type='ColinearityDecayOptimWrapper',
    optimizer=dict(lr=2e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    cd=dict(strength=2.0))
