# ViTDet Mask R-CNN, ViT-B backbone, LSJ 1024, 100 epochs (Li et al., ECCV
# 2022): the model file, the LSJ data + schedule file, mmdet's runtime.
# Baseline without Colinearity Decay.
_base_ = [
    '../_base_/models/vitdet_mask-rcnn_vit-b.py',
    './lsj-100e_coco-instance.py', 'mmdet::_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)

default_hooks = dict(
    logger=dict(interval=50),
    # a checkpoint at every validation
    checkpoint=dict(by_epoch=False, interval={{_base_.interval}},
                    max_keep_ckpts=5))
log_processor = dict(by_epoch=False)
