# A CPU-sized DINO (5 feature levels) with the toy Swin backbone, trained with
# Colinearity Decay on the toy COCO set (boxes only): the real model file, the
# toy data, schedule and runtime, and only what must shrink overridden
# (backbone, layers, FFN widths, queries, denoising queries; the transformer
# keeps 256 channels: mmdet's DINO decoder encodes reference points with a
# fixed 128 features per coordinate, so embed_dims must be 256). CD finds the
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
val_evaluator = dict(metric='bbox')
test_evaluator = val_evaluator
default_hooks = dict(checkpoint=dict(interval=4))  # epochs
optim_wrapper = dict(
    type='ColinearityDecayOptimWrapper', cd=dict(strength=2.0))
