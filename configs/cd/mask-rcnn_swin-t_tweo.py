# Comparison twin: TWEO-style activation penalty on the outputs of the Swin
# blocks (tau 3, p 4, weight 0.01), through the same optim wrapper, without CD.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)

optim_wrapper = dict(
    type='ColinearityDecayOptimWrapper',
    tweo=dict(weight=0.01, tau=3.0, p=4.0))
