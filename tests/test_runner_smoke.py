"""Train the toy Swin Mask R-CNN with CD for a few iterations on the micro toy
set, evaluate it with CocoMetric, and resume from its checkpoint (weights,
message hub, optimizer and CD state)."""
import os.path as osp

import torch
from mmengine.runner import Runner

from conftest import REPO, micro_config

CD_CONFIG = osp.join(REPO, 'configs', 'toy',
                     'mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd.py')


def test_train_evaluate_and_resume(micro_data_root, tmp_path):
    cfg = micro_config(micro_data_root, tmp_path, base=CD_CONFIG,
                       max_epochs=1)
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 4  # 8 images, batch 2
    ckpt = osp.join(tmp_path, 'epoch_1.pth')
    assert osp.isfile(ckpt)
    metrics = runner.val_loop.run()
    assert {'coco/bbox_mAP', 'coco/segm_mAP'} <= set(metrics)
    assert all(-1 <= metrics[k] <= 1 for k in ('coco/bbox_mAP',
                                                 'coco/segm_mAP'))
    weights = {k: v.clone() for k, v in runner.model.state_dict().items()}
    loss_history = runner.message_hub.get_scalar('train/loss').data[0].copy()

    # resume: epoch 2 starts from the saved state, message hub included
    cfg2 = micro_config(micro_data_root, tmp_path, base=CD_CONFIG,
                        max_epochs=2)
    cfg2.resume, cfg2.load_from = True, ckpt
    resumed = Runner.from_cfg(cfg2)
    resumed.load_or_resume()
    assert resumed.iter == 4 and resumed.epoch == 1
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    hub_history = resumed.message_hub.get_scalar('train/loss').data[0]
    assert (hub_history[:len(loss_history)] == loss_history).all()
    cd_state = runner.optim_wrapper.state_dict()['regularizers']['cd']
    resumed.optim_wrapper.bind_model(resumed.model)
    resumed_state = resumed.optim_wrapper.state_dict()['regularizers']['cd']
    assert cd_state.keys() == resumed_state.keys() and len(cd_state) == 30
    for key, value in cd_state.items():
        assert torch.equal(value, resumed_state[key]), key
    resumed.train()
    assert resumed.iter == 8 and resumed.epoch == 2


def test_run_bounded_kills_a_hung_process_tree():
    """The harness of the torchrun tests: a command whose child hangs in a
    session of its own (as torchrun's workers live) fails the test at the
    deadline, and no process of it survives."""
    import subprocess
    import sys
    import time

    import pytest

    from conftest import _processes_tagged, run_bounded
    hang = ('import subprocess, sys, time; subprocess.Popen([sys.executable, '
            '"-c", "import time; time.sleep(600)"], start_new_session=True); '
            'print("started", flush=True); time.sleep(600)')
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match='did not finish in 3'):
        run_bounded([sys.executable, '-c', hang], timeout=3)
    assert time.monotonic() - start < 60
    code, out = run_bounded([sys.executable, '-c', 'print("done")'], 60)
    assert (code, out) == (0, 'done\n')
    leftover = subprocess.run(['pgrep', '-f', 'time.sleep\\(600\\)'],
                              capture_output=True, text=True).stdout
    assert leftover == '', leftover
