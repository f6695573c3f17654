"""Every shipped toy config through the command a user runs
(``tools/train.py``, or ``tools/test.py`` for the PTQ configs), with the
hooks the tool adds and the dataloader workers the config asks for, for long
enough to cross an epoch boundary (a loader restart) and a resume; no process
of a run may outlive it.

The epoch-based Swin CD config and the iteration-based ViTDet config (the two
loop kinds) also resume from their middle checkpoint and must end with the
uninterrupted run's weights, bit for bit. The other configs are ``slow``
(``pytest -m slow``)."""
import glob
import os.path as osp
import sys

import pytest
import torch
from mmengine.config import Config

from conftest import REPO, run_bounded

TOY_CONFIGS = sorted(glob.glob(osp.join(REPO, 'configs', 'toy', '*.py')))
#: run in the default suite: one config of each loop kind
FAST = ('mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd.py',
        'vitdet_mask-rcnn_vit-toy_toy-coco_cd.py')


def config_params(configs):
    return [pytest.param(path, id=osp.basename(path)[:-3],
                         marks=() if osp.basename(path) in FAST else
                         pytest.mark.slow) for path in configs]


def is_ptq(cfg):
    return any(h.get('type') == 'PostTrainingQuantHook'
               for h in cfg.get('custom_hooks') or [])


def data_options(data_root):
    """``--cfg-options`` pointing a toy config at the micro set."""
    ann = osp.join(data_root, 'annotations', 'instances_val.json')
    return [f'{loader}.dataset.data_root={data_root}'
            for loader in ('train_dataloader', 'val_dataloader',
                           'test_dataloader')] + [
        f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']


def schedule_options(cfg):
    """Two passes over the 8 micro images (batch 2), a checkpoint and a
    validation after the first (which the resumed run skips): epochs, or 8
    iterations for an iteration-based config. Returns the options and the
    middle and last checkpoints' names."""
    if cfg.train_cfg.get('type') == 'IterBasedTrainLoop':
        return ['train_cfg.max_iters=8', 'train_cfg.val_interval=4',
                'default_hooks.checkpoint.interval=4'], 'iter_4.pth', \
            'iter_8.pth'
    return ['train_cfg.max_epochs=2', 'train_cfg.val_interval=1',
            'default_hooks.checkpoint.interval=1'], 'epoch_1.pth', \
        'epoch_2.pth'


def run_tool(tool, *args, timeout=400):
    code, output = run_bounded([sys.executable, osp.join('tools', tool),
                                *map(str, args)], timeout=timeout)
    assert code == 0, output[-5000:]
    return output


def train(config, work_dir, options, resume=None):
    args = [config, '--work-dir', work_dir, '--cfg-options', *options]
    if resume is not None:
        args[1:1] = ['--resume', resume]
    return run_tool('train.py', *args)


def final_weights(work_dir):
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return torch.load(f.read().strip(), map_location='cpu')['state_dict']


#: the toy config whose one-epoch checkpoint stands for a trained model of
#: each detector type (what the QAT configs fine-tune, the PTQ configs
#: quantize)
FLOAT_CONFIGS = {
    'MaskRCNN': 'mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py',
    'CascadeRCNN':
    'cascade-mask-rcnn_swin-toy-p4-w7_fpn_giou-4conv1f_12e_toy-coco_cd.py',
    'Mask2Former': 'mask2former_swin-toy-p4-w7_12e_toy-coco_cd.py',
    'DINO': 'dino-5scale_swin-toy_12e_toy-coco_cd.py',
}


@pytest.fixture(scope='module')
def float_checkpoint(micro_data_root, tmp_path_factory):
    """``float_checkpoint(detector_type)``: a toy checkpoint of that type,
    one epoch through tools/train.py, made once per module."""
    made = {}

    def checkpoint(detector_type):
        if detector_type not in made:
            work_dir = tmp_path_factory.mktemp('float')
            train(osp.join(REPO, 'configs', 'toy',
                           FLOAT_CONFIGS[detector_type]), work_dir,
                  data_options(micro_data_root) + [
                      'train_cfg.max_epochs=1', 'train_cfg.val_interval=1'])
            made[detector_type] = str(work_dir / 'epoch_1.pth')
        return made[detector_type]
    return checkpoint


@pytest.mark.parametrize('config', config_params(
    [c for c in TOY_CONFIGS if not is_ptq(Config.fromfile(c))]))
def test_toy_config_trains_through_train_py(config, micro_data_root,
                                            tmp_path, request):
    cfg = Config.fromfile(config)
    assert cfg.train_dataloader.num_workers >= 1  # workers as shipped
    schedule, middle, last = schedule_options(cfg)
    options = data_options(micro_data_root) + schedule
    if cfg.model.type == 'QATDetector':  # fine-tunes a float checkpoint
        load_from = request.getfixturevalue('float_checkpoint')(
            cfg.model.detector.type)
        options += ['load_from=' + load_from,
                    'custom_hooks.0.calib.num_images=4']
    elif cfg.get('load_from'):  # fine-tunes another config's checkpoint
        options.append('load_from=' + request.getfixturevalue(
            'float_checkpoint')(cfg.model.type))
    output = train(config, tmp_path / 'run', options)
    assert osp.isfile(tmp_path / 'run' / last) and 'coco/bbox_mAP' in output
    assert 'Reach the end of the dataloader' not in output
    assert 'RNGStateHook:' not in output  # nothing keeps resume inexact
    for regularizer in cfg.optim_wrapper.get('regularizers') or []:
        if regularizer['type'] == 'alignment_growth':  # the planted model
            assert 'alignment_growth_align_ffn_max' in output
    if osp.basename(config) not in FAST:
        return
    # resume from the middle checkpoint in another work dir: same weights
    resumed = train(config, tmp_path / 'resumed', options,
                    resume=tmp_path / 'run' / middle)
    assert 'RNGStateHook:' not in resumed
    expected = final_weights(tmp_path / 'run')
    actual = final_weights(tmp_path / 'resumed')
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.mark.slow
@pytest.mark.parametrize('config', config_params(
    [c for c in TOY_CONFIGS if is_ptq(Config.fromfile(c))]))
def test_toy_ptq_config_evaluates_through_test_py(config, micro_data_root,
                                                  float_checkpoint,
                                                  tmp_path):
    checkpoint = float_checkpoint(Config.fromfile(config).model.type)
    output = run_tool('test.py', config, checkpoint, '--work-dir',
                      tmp_path, '--cfg-options',
                      *data_options(micro_data_root),
                      'custom_hooks.0.calib.num_images=4')
    assert 'coco/bbox_mAP' in output
    assert osp.isfile(tmp_path / 'quant_results.json')
