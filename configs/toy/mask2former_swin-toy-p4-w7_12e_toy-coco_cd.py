# A CPU-sized Mask2Former (instance segmentation) with the toy Swin backbone,
# trained with Colinearity Decay on the toy COCO set: the real model file, the
# toy data, schedule and runtime, and only what must shrink overridden
# (backbone, widths, layers, queries, sampled points, 256 px fixed-size
# padding). CD finds the backbone's pairs and those of the transformer
# decoder's self- and cross-attention (nn.MultiheadAttention) and FFNs.
#   python tools/train.py configs/toy/mask2former_swin-toy-p4-w7_12e_toy-coco_cd.py
_base_ = [
    '../_base_/models/mask2former_swin-t-p4-w7_instance.py',
    '../_base_/datasets/toy-coco_instance.py',
    '../_base_/schedules/toy_12e.py', '../_base_/toy_runtime.py'
]
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)

embed_dims = 32
channels = 64
num_classes = 4
model = dict(
    data_preprocessor=dict(batch_augments=[
        dict(
            type='BatchFixedSizePad',
            size=(256, 256),
            img_pad_value=0,
            pad_mask=True,
            mask_pad_value=0,
            pad_seg=False)
    ]),
    backbone=dict(
        embed_dims=embed_dims,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 4, 8],
        drop_path_rate=0.1,
        convert_weights=False,
        init_cfg=None),
    panoptic_head=dict(
        in_channels=[embed_dims * 2**i for i in range(4)],
        feat_channels=channels,
        out_channels=channels,
        num_things_classes=num_classes,
        num_queries=20,
        pixel_decoder=dict(
            norm_cfg=dict(type='GN', num_groups=8),
            encoder=dict(
                num_layers=2,
                layer_cfg=dict(
                    self_attn_cfg=dict(embed_dims=channels, num_heads=4),
                    ffn_cfg=dict(
                        embed_dims=channels,
                        feedforward_channels=2 * channels))),
            positional_encoding=dict(num_feats=channels // 2)),
        positional_encoding=dict(num_feats=channels // 2),
        transformer_decoder=dict(
            num_layers=3,
            layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=channels, num_heads=4),
                cross_attn_cfg=dict(embed_dims=channels, num_heads=4),
                ffn_cfg=dict(
                    embed_dims=channels,
                    feedforward_channels=2 * channels))),
        loss_cls=dict(class_weight=[1.0] * num_classes + [0.1])),
    panoptic_fusion_head=dict(num_things_classes=num_classes),
    train_cfg=dict(num_points=1024),
    test_cfg=dict(max_per_image=50))
default_hooks = dict(checkpoint=dict(interval=4))  # epochs
optim_wrapper = dict(
    type='ColinearityDecayOptimWrapper', cd=dict(strength=2.0))
