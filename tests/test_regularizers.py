"""S2D and TWEO on hand-built cases, and all regularizers in a Runner run of
the toy Swin Mask R-CNN with the metrics in the MMEngine log."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.runner import Runner
from torch import nn

from conftest import REPO, micro_config
from mmcd.core import ActivationPenalty, SelectiveSpectralDecay


def _matrix_with_singular_values(s, rows=6, cols=5):
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), dtype=torch.float64))
    return u, torch.tensor(s, dtype=torch.float64), v


def test_s2d_rank_selection_and_update():
    u, s, v = _matrix_with_singular_values([4.0, 1.0, 0.1])
    w = nn.Parameter(u @ torch.diag(s) @ v.T)
    w0 = w.detach().clone()
    # energy shares: 16/17.01 = 0.941 < 0.95, 17/17.01 = 0.9994 -> k = 2
    s2d = SelectiveSpectralDecay([w], strength=0.01, tau=0.95, max_rank=3,
                                 power=2)
    assert s2d.selected_rank(s) == 2
    assert SelectiveSpectralDecay([w], max_rank=1).selected_rank(s) == 1
    assert SelectiveSpectralDecay([w], tau=0.9).selected_rank(s) == 1
    s2d.step(lambda p: 0.5)
    expected = 0.5 * 0.01 * (16 * u[:, :1] @ v[:, :1].T +
                             1 * u[:, 1:2] @ v[:, 1:2].T)
    torch.testing.assert_close(w0 - w.detach(), expected)


def test_s2d_uses_cached_vectors_between_refreshes():
    u, s, v = _matrix_with_singular_values([3.0, 1.0])
    w = nn.Parameter(u @ torch.diag(s) @ v.T)
    s2d = SelectiveSpectralDecay([w], svd_interval=3)
    calls = []
    real_refresh = s2d.refresh
    s2d.refresh = lambda: calls.append(s2d.steps) or real_refresh()
    for _ in range(7):
        s2d.step(lambda p: 1.0)
    assert calls == [0, 3, 6]


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Identity(), nn.Identity()])

    def forward(self, x):
        return self.blocks[1](self.blocks[0](x) * 2)


def test_tweo_penalty_matches_hand_computation():
    model = TwoBlocks()
    penalty = ActivationPenalty(list(model.blocks), weight=0.1, tau=3.0,
                                p=4.0)
    x = torch.tensor([3.0, -6.0], requires_grad=True)
    model(x)
    # block 0 outputs (3, -6): mean((1, 2)^4) = 8.5; block 1 (6, -12): 136
    loss = penalty.pop_loss()
    assert loss.item() == pytest.approx(0.1 * (8.5 + 136) / 2)
    loss.backward()
    assert x.grad is not None and (x.grad.abs() > 0).all()
    assert penalty.pop_loss().item() == 0  # consumed
    model.eval()
    model(x)  # eval forwards are not penalized
    assert penalty.pop_loss().item() == 0
    with pytest.raises(ValueError):
        ActivationPenalty(list(model.blocks), tau=0)
    penalty.remove()


def test_runner_logs_cd_s2d_tweo_metrics(micro_data_root, tmp_path):
    cfg = micro_config(
        micro_data_root, tmp_path,
        base=osp.join(REPO, 'configs', 'toy',
                      'mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd.py'))
    cfg.optim_wrapper.s2d = dict(strength=5e-4)
    cfg.optim_wrapper.tweo = dict(weight=0.01)
    runner = Runner.from_cfg(cfg)
    runner.train()
    log = open(glob.glob(osp.join(tmp_path, '*', '*.log'))[0]).read()
    # toy Swin: depths 1/1/2/1 = 5 blocks x 3 kinds
    assert 'ColinearityDecayOptimWrapper: 15 matrix pairs' in log
    for key in ('cd_align_ffn_mean', 'cd_align_vo_max', 'cd_align_qk_mean',
                'cd_update_norm', 's2d_update_norm', 'loss_tweo'):
        assert key in log, key
    scalars = open(glob.glob(osp.join(tmp_path, '*', 'vis_data',
                                      'scalars.json'))[0]).read()
    assert 'cd_align_ffn_mean' in scalars
