# Comparison twin: Selective Spectral Decay (S2D paper defaults) on the same
# matrices CD acts on, through the same optim wrapper, without CD.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)

optim_wrapper = dict(
    type='ColinearityDecayOptimWrapper',
    s2d=dict(strength=5e-4, tau=0.95, max_rank=3, svd_interval=100, power=2))
