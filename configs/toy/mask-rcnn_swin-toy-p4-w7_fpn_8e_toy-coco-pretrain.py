# Pretraining of the toy Swin Mask R-CNN on a larger generated set (1024
# train images of another seed, disjoint from the toy set), the stand-in for
# a pretrained backbone: the toy detectors of docs/experiment fine-tune from
# it. 8 epochs (4096 iterations at batch 2) at AdamW lr 1e-3, lr drops at
# epochs 6 and 7; a checkpoint every epoch, so `tools/train.py --resume`
# continues an interrupted run. Generate the set first:
#   python tools/misc/make_toy_coco.py data/toy_coco_pretrain \
#       --num-train 1024 --num-val 64 --seed 1
_base_ = './mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py'

data_root = 'data/toy_coco_pretrain/'
max_epochs = 8
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[6, 7],
        gamma=0.1)
]
optim_wrapper = dict(optimizer=dict(lr=1e-3))
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=2))
