# Cascade Mask R-CNN Swin-S (the Swin repository's 3x recipe, 51.9 box / 45.0 mask AP, configs/swin/)
# trained with Colinearity Decay. Only the optim wrapper type changes: AdamW,
# its paramwise_cfg and the 36-epoch schedule are inherited as they are.
# strength and interval as in mask-rcnn_swin-t_cd.py (an untuned starting
# point; docs/en/benchmarks.md for the interval's cost).
#   python tools/train.py configs/cd/cascade-mask-rcnn_swin-s_cd.py
_base_ = '../swin/cascade-mask-rcnn_swin-s-p4-w7_fpn_giou-4conv1f_ms-crop-3x_coco.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
optim_wrapper = dict(
    type='ColinearityDecayOptimWrapper', cd=dict(strength=0.1, interval=4))
