# ViTDet Mask R-CNN ViT-B trained with Colinearity Decay: the baseline config
# with only the optim wrapper type changed (layer-wise lr decay, AdamW and the
# schedule are inherited). 12 blocks x (ffn, vo, qk) = 36 pairs.
_base_ = '../vitdet/vitdet_mask-rcnn_vit-b_100e_coco.py'

# interval 4 as the Swin-T config (cost and fidelity: docs/en/benchmarks.md)
optim_wrapper = dict(
    type='ColinearityDecayOptimWrapper', cd=dict(strength=0.1, interval=4))
