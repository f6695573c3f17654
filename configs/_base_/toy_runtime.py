# mmdet's runtime for the toy runs: logs every 10 iterations, the last 2
# checkpoints kept, seeded (the COCO configs keep MMEngine's random seed).
_base_ = 'mmdet::_base_/default_runtime.py'

default_hooks = dict(
    logger=dict(interval=10), checkpoint=dict(max_keep_ckpts=2))
log_processor = dict(window_size=10)
randomness = dict(seed=0)
