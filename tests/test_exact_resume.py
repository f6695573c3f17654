"""RNGStateHook's messages and parts: checkpoints without RNG states or from
another world size resume and say so, persistent workers are turned off by
``tools/train.py`` and warned about when a Runner is built by hand, states
round-trip. That a resumed run ends with the uninterrupted run's weights,
bit for bit, is tested through ``tools/train.py`` (test_train_tool.py)."""
import glob
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from conftest import REPO, micro_config
from mmcd.engine.hooks.rng_state_hook import (capture_rng_states,
                                              restore_rng_states)
from mmcd.utils.runner_setup import add_rng_state_hook

CD_CONFIG = osp.join(REPO, 'configs', 'toy',
                     'mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd.py')


def exact_resume_config(data_root, work_dir, rng_hook=True):
    cfg = micro_config(data_root, work_dir, base=CD_CONFIG, max_epochs=2)
    pipeline = [t['type'] for t in cfg.train_dataloader.dataset.pipeline]
    assert 'RandomFlip' in pipeline  # augmentation draws random numbers
    cfg.train_dataloader.num_workers = 1
    cfg.train_dataloader.persistent_workers = False  # as tools/train.py
    cfg.custom_hooks = [dict(type='RNGStateHook')] if rng_hook else []
    return cfg


def train(cfg, resume_from=None):
    if resume_from is not None:
        cfg.resume, cfg.load_from = True, resume_from
    runner = Runner.from_cfg(cfg)
    runner.train()
    return {k: v.clone() for k, v in runner.model.state_dict().items()}


def warnings_of(cfg):
    """The RNGStateHook lines of the run's text log."""
    log_file, = glob.glob(osp.join(cfg.work_dir, '*', '*.log'))
    with open(log_file) as f:
        return [line for line in f if 'RNGStateHook:' in line]


@pytest.fixture(scope='module')
def uninterrupted(micro_data_root, tmp_path_factory):
    """Two epochs in one go; its epoch-1 checkpoint is the resume point."""
    work_dir = tmp_path_factory.mktemp('uninterrupted')
    weights = train(exact_resume_config(micro_data_root, work_dir))
    return weights, str(work_dir / 'epoch_1.pth')


def test_checkpoint_without_rng_states_resumes_and_says_so(
        micro_data_root, tmp_path, uninterrupted):
    weights, epoch1 = uninterrupted
    ckpt = torch.load(epoch1)
    del ckpt['rng_states']
    old = str(tmp_path / 'old_epoch_1.pth')
    torch.save(ckpt, old)
    cfg = exact_resume_config(micro_data_root, tmp_path / 'run')
    resumed = train(cfg, resume_from=old)
    assert any(not torch.equal(resumed[k], v) for k, v in weights.items())
    lines = warnings_of(cfg)
    assert len(lines) == 1 and 'not bit-exactly' in lines[0]


def test_checkpoint_of_another_world_size_restores_rank0_and_says_so(
        micro_data_root, tmp_path, uninterrupted):
    weights, epoch1 = uninterrupted
    ckpt = torch.load(epoch1)
    ckpt['rng_states']['ranks'] *= 2  # as if saved by 2 processes
    two_ranks = str(tmp_path / 'two_ranks_epoch_1.pth')
    torch.save(ckpt, two_ranks)
    cfg = exact_resume_config(micro_data_root, tmp_path / 'run')
    resumed = train(cfg, resume_from=two_ranks)
    for key, value in weights.items():  # rank 0's streams: same run here
        assert torch.equal(resumed[key], value), key
    lines = warnings_of(cfg)
    assert len(lines) == 1
    assert 'RNG states of 2 rank(s), this run has 1' in lines[0]


def test_rng_states_round_trip():
    import random

    import numpy as np
    state = capture_rng_states()
    first = (random.random(), np.random.rand(3), np.random.randn(),
             torch.rand(3))
    restore_rng_states(state)
    again = (random.random(), np.random.rand(3), np.random.randn(),
             torch.rand(3))
    assert first[0] == again[0]
    assert np.array_equal(first[1], again[1]) and first[2] == again[2]
    assert torch.equal(first[3], again[3])


@pytest.mark.parametrize('loop,turned_off', [
    (dict(type='EpochBasedTrainLoop', max_epochs=2), True),
    (dict(by_epoch=True, max_epochs=2), True),
    (dict(type='IterBasedTrainLoop', max_iters=8), False),
])
def test_train_tool_turns_persistent_workers_off_for_epochs(loop,
                                                            turned_off):
    cfg = Config(dict(train_cfg=loop, train_dataloader=dict(
        num_workers=1, persistent_workers=True)))
    add_rng_state_hook(cfg)
    assert [h['type'] for h in cfg.custom_hooks] == ['RNGStateHook']
    assert cfg.train_dataloader.persistent_workers is not turned_off
    add_rng_state_hook(cfg)  # idempotent
    assert len(cfg.custom_hooks) == 1


def test_hook_warns_of_persistent_workers_in_an_epoch_loop(monkeypatch):
    from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
    from torch.utils.data import DataLoader

    from mmcd.engine.hooks import rng_state_hook
    lines = []
    monkeypatch.setattr(rng_state_hook, 'print_log',
                        lambda msg, **kwargs: lines.append(msg))
    for loop, persistent, warned in (
            (EpochBasedTrainLoop, True, True),
            (EpochBasedTrainLoop, False, False),
            (IterBasedTrainLoop, True, False)):
        runner = SimpleNamespace(
            train_loop=object.__new__(loop),  # only its type is read
            train_dataloader=DataLoader(range(4), num_workers=1,
                                        persistent_workers=persistent))
        lines.clear()
        rng_state_hook.RNGStateHook().before_train(runner)
        assert bool(lines) is warned
        assert all('persistent_workers=False' in line for line in lines)
