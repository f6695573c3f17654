# DINO Swin-L (5 scales) (mmdet's 12-epoch config) trained with Colinearity Decay. Only the optim
# wrapper type changes: AdamW, clip_grad, paramwise_cfg and the schedule are
# inherited as they are. CD acts on the Swin backbone's pairs and on the
# transformer layers' (FFN fc1->fc2; value->output and query<->key of every
# nn.MultiheadAttention, self- and cross-attention; deformable attention has
# none); strength and interval as in mask-rcnn_swin-t_cd.py (untuned).
#   python tools/train.py configs/cd/dino-5scale_swin-l_cd.py
_base_ = 'mmdet::dino/dino-5scale_swin-l_8xb2-12e_coco.py'
custom_imports = dict(imports=['mmcd'], allow_failed_imports=False)
optim_wrapper = dict(
    type='ColinearityDecayOptimWrapper', cd=dict(strength=0.1, interval=4))
