# The CPU-sized toy Swin Mask R-CNN trained with Colinearity Decay.
# The toy schedule sums to only ~0.15 in lr (384 steps at 4e-4), so the
# strength is larger than the COCO config's to give CD the same leverage.
_base_ = './mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)

optim_wrapper = dict(type='ColinearityDecayOptimWrapper', cd=dict(strength=2.0))
