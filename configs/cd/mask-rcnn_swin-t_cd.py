# Mask R-CNN Swin-T (MMDetection's 1x COCO config) trained with Colinearity
# Decay. Only the optim wrapper type changes: AdamW, its paramwise_cfg and the
# schedule are inherited as they are.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)

# strength: weight-decay-like (lr * strength per step along a fully aligned
# direction). 0.1 is an untuned starting point, twice Swin's AdamW decay.
# interval 4: the update every 4th optimizer step, 4x as large (the same
# total decay), 0.25% of a full 800x1344 step on CPU instead of 1.05%; on the
# toy it ends within 1% of every-step CD's ffn/vo alignment and 3-5% of its
# max|x| (qk alignment 11% lower); docs/en/benchmarks.md.
optim_wrapper = dict(
    type='ColinearityDecayOptimWrapper', cd=dict(strength=0.1, interval=4))
