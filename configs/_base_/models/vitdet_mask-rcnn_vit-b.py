# ViTDet Mask R-CNN model, ViT-B backbone at 1024 px (Li et al., ECCV 2022),
# with mmcd's ViTDet backbone and SimpleFPN (mmdet 3.3.0's wheel ships no
# projects/ViTDet), on mmdet's Mask R-CNN model base; data and schedule come
# from another base (lsj-100e_coco-instance.py, or the toy set's).
#
# MAE init: set model.backbone.init_cfg=dict(type='Pretrained',
# checkpoint='mae_pretrain_vit_base.pth') (keys map one to one; see
# mmcd.models.backbones.ViTDet.load_mae). Without it training starts from
# scratch.
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'

norm_cfg = dict(type='LN2d', requires_grad=True)
head_norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    data_preprocessor=dict(pad_size_divisor=32, batch_augments=[
        dict(type='BatchFixedSizePad', size=(1024, 1024), pad_mask=True)
    ]),
    backbone=dict(
        _delete_=True,
        type='ViTDet',
        img_size=1024,
        patch_size=16,
        embed_dims=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4,
        drop_path_rate=0.1,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
        use_rel_pos=True,
        init_cfg=None),
    neck=dict(
        _delete_=True,
        type='SimpleFPN',
        in_channels=768,
        out_channels=256,
        num_outs=5,
        norm_cfg=norm_cfg),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256,
            norm_cfg=head_norm_cfg),
        mask_head=dict(norm_cfg=head_norm_cfg)))
