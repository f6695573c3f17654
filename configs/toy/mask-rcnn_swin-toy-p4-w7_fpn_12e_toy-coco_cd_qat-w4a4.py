# W4A4 OFQ quantization-aware fine-tuning of the toy Swin Mask R-CNN trained
# with CD (the demo's checkpoint), CD kept on; the QAT settings are those of
# the baseline's ..._qat-w4a4.py.
#   python tools/train.py configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd_qat-w4a4.py
_base_ = './mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_qat-w4a4.py'
load_from = 'work_dirs/demo/epoch_12.pth'
# CD as in ..._cd.py (the two bases cannot be merged: both set optim_wrapper)
optim_wrapper = dict(type='ColinearityDecayOptimWrapper',
                     cd=dict(strength=2.0))
