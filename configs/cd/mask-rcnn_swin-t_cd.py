# Mask R-CNN Swin-T (MMDetection's 1x COCO config) trained with Colinearity
# Decay. Only the optim wrapper type changes: AdamW, its paramwise_cfg and the
# schedule are inherited as they are.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)

# strength: weight-decay-like (lr * strength per step along a fully aligned
# direction). 0.1 is an untuned starting point, twice Swin's AdamW decay.
optim_wrapper = dict(type='ColinearityDecayOptimWrapper', cd=dict(strength=0.1))
