import copy
import os.path as osp
import socket
import uuid
import warnings

import pytest

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import mmcd  # noqa: E402,F401
from mmengine.config import Config  # noqa: E402

from mmcd.datasets import ToyCocoSpec, ensure_toy_coco  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY_CONFIG = osp.join(REPO, 'configs', 'toy',
                      'mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py')
MICRO_SPEC = ToyCocoSpec(num_train=8, num_val=4, min_side=96, max_side=128,
                         max_objects=3, seed=7)


@pytest.fixture(scope='session')
def micro_data_root(tmp_path_factory):
    """A micro toy COCO set (8 train / 4 val images), made once per run."""
    root = str(tmp_path_factory.mktemp('toy_coco'))
    ensure_toy_coco(root, MICRO_SPEC)
    return root + '/'


def free_port() -> int:
    """A free loopback port for a test's process group."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def micro_config(data_root, work_dir, base=TOY_CONFIG, img_scale=(128, 128),
                 max_epochs=1):
    """A config file's content pointed at the micro set: smaller images, a
    one-epoch schedule, no worker processes, no visualisation."""
    cfg = Config.fromfile(base)
    cfg.work_dir = str(work_dir)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dl = cfg[loader]
        dl.num_workers = 0
        dl.persistent_workers = False
        dl.dataset.data_root = data_root
        for t in dl.dataset.pipeline:
            if t['type'] == 'Resize':
                t['scale'] = img_scale
    for ev in ('val_evaluator', 'test_evaluator'):
        cfg[ev].ann_file = osp.join(data_root,
                                    'annotations/instances_val.json')
    if cfg.train_cfg.get('type') == 'IterBasedTrainLoop':
        cfg.train_cfg.max_iters = 4 * max_epochs  # an epoch of 8 images
        cfg.train_cfg.val_interval = 4 * max_epochs
    else:
        cfg.train_cfg.max_epochs = max_epochs
        cfg.train_cfg.val_interval = max_epochs
    for aug in cfg.model.data_preprocessor.get('batch_augments') or []:
        aug['size'] = img_scale
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
             end=2)
    ]
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1)
    if cfg.train_cfg.get('type') == 'IterBasedTrainLoop':
        cfg.default_hooks.checkpoint.update(interval=4 * max_epochs,
                                            by_epoch=False)
    cfg.default_hooks.pop('visualization', None)
    cfg.log_processor.window_size = 1
    cfg.randomness = dict(seed=0)
    # MMEngine's logger and visualizer are named singletons: give each
    # runner its own, or a later runner writes into an earlier one's dirs
    cfg.experiment_name = f'micro_{uuid.uuid4().hex[:8]}'
    cfg.visualizer.name = cfg.experiment_name
    return copy.deepcopy(cfg)
