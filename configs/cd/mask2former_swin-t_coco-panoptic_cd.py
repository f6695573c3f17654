# Mask2Former Swin-T for COCO panoptic segmentation (mmdet's 50-epoch LSJ
# config) trained with Colinearity Decay: the instance model's pairs (the
# panoptic head is the same transformer decoder with stuff classes added), the
# optim wrapper type changed and nothing else; strength and interval as in
# mask2former_swin-t_cd.py (untuned).
#   python tools/train.py configs/cd/mask2former_swin-t_coco-panoptic_cd.py
_base_ = 'mmdet::mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco-panoptic.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
optim_wrapper = dict(
    type='ColinearityDecayOptimWrapper', cd=dict(strength=0.1, interval=4))
