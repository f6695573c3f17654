# Mask R-CNN Swin-S trained with Colinearity Decay: mmdet's 3x multi-scale-crop
# AMP config, its port of the Swin repository's mask_rcnn_swin_small_patch4_
# window7_mstrain_480-800_adamw_3x_coco recipe (48.5 / 43.3 box / mask AP
# there, 48.2 / 43.2 in mmdet). Only the optim wrapper type changes: AdamW,
# its paramwise_cfg and the 36-epoch schedule are inherited as they are.
# The inherited config trains with AMP (AmpOptimWrapper): CD's AMP wrapper keeps
# it (and skips CD on the steps AMP skips).
# strength and interval as in mask-rcnn_swin-t_cd.py (an untuned starting
# point; docs/en/benchmarks.md for the interval's cost).
#   python tools/train.py configs/cd/mask-rcnn_swin-s_cd.py
_base_ = 'mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
optim_wrapper = dict(
    type='ColinearityDecayAmpOptimWrapper', cd=dict(strength=0.1, interval=4))
