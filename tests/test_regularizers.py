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


def test_s2d_rank_selection_and_penalty_gradient():
    u, s, v = _matrix_with_singular_values([4.0, 1.0, 0.1])
    w = nn.Parameter(u @ torch.diag(s) @ v.T)
    # energy shares: 16/17.01 = 0.941 < 0.95, 17/17.01 = 0.9994 -> k = 2
    s2d = SelectiveSpectralDecay([w], strength=0.01, tau=0.95, max_rank=3,
                                 power=2)
    assert s2d.selected_rank(s) == 2
    assert SelectiveSpectralDecay([w], tau=0.9).selected_rank(s) == 1
    # max_rank 1 and no share >= tau within it: no k, no penalty (not k=1)
    assert SelectiveSpectralDecay([w], max_rank=1).selected_rank(s) == 0
    penalty = s2d.penalty()
    # the paper's loss: lam / (n + 1) * (4^3 + 1^3)
    assert penalty.item() == pytest.approx(0.01 / 3 * 65)
    penalty.backward()
    # its gradient: lam * sum_i s_i^n u_i v_i^T
    expected = 0.01 * (16 * u[:, :1] @ v[:, :1].T +
                       1 * u[:, 1:2] @ v[:, 1:2].T)
    torch.testing.assert_close(w.grad, expected)
    # and autograd of the loss written from the singular values
    w.grad = None
    (0.01 / 3 * torch.linalg.svdvals(w)[:2].pow(3).sum()).backward()
    torch.testing.assert_close(w.grad, expected)


def test_s2d_layer_with_no_qualifying_rank_gets_nothing():
    u, s, v = _matrix_with_singular_values([1.0, 1.0, 1.0])  # flat spectrum
    flat = nn.Parameter(u @ torch.diag(s) @ v.T)
    u2, s2, v2 = _matrix_with_singular_values([5.0, 0.1, 0.1])
    peaked = nn.Parameter(u2 @ torch.diag(s2) @ v2.T)
    s2d = SelectiveSpectralDecay([flat, peaked], strength=1.0, tau=0.95,
                                 max_rank=2)
    s2d.penalty().backward()
    assert flat.grad is None or not flat.grad.any()
    assert peaked.grad.abs().sum() > 0
    only_flat = SelectiveSpectralDecay([flat], strength=1.0, max_rank=2)
    assert only_flat.penalty().item() == 0


def test_s2d_that_penalizes_nothing_says_so_once_per_refresh(monkeypatch):
    """Flat spectra never reach tau: the wrapper logs the count of
    penalized matrices (0) and one warning per SVD refresh with the share
    reached: all 16 singular values equal -> top 2 carry 2/16; then 4
    equal and the rest zero -> 2/4; then one: penalized, no warning."""
    from mmengine.logging import MessageHub
    from mmengine.optim import build_optim_wrapper
    from mmcd.engine.optim_wrappers import colinearity_decay_optim_wrapper
    from test_colinearity import ViT
    logged = []
    monkeypatch.setattr(colinearity_decay_optim_wrapper, 'print_log',
                        lambda msg, **kwargs: logged.append(msg))
    model = ViT()
    wrapper = build_optim_wrapper(model, dict(
        type='ColinearityDecayOptimWrapper',
        optimizer=dict(type='SGD', lr=0.0),
        s2d=dict(max_rank=2, svd_interval=3)))
    wrapper.initialize_count_status(model, 0, 8)
    matrices = list({id(w): w for pair in wrapper.matrix_pairs
                     for w in pair.parameters}.values())

    def set_spectrum(nonzero):
        with torch.no_grad():
            for w in matrices:
                w.copy_(torch.eye(*w.shape) * 2)
                w[nonzero:] = 0
    set_spectrum(16)
    for it in range(8):  # refreshes before steps 0, 3, 6
        if it in (3, 6):
            set_spectrum(4 if it == 3 else 1)
        wrapper.update_params(model(torch.randn(2, 5, 16)).mean())
    message = ('S2D penalizes none of its {} matrices: their top 2 '
               'singular values carry at most {} of the energy, below tau '
               '0.95 (lower tau or raise max_rank for a penalty)')
    assert [m for m in logged if m.startswith('S2D')] == [
        message.format(len(matrices), share)
        for share in ('0.125', '0.500')]
    hub = MessageHub.get_current_instance()
    penalized = hub.get_scalar('train/s2d_penalized_matrices')
    assert penalized.data[0][-8:].tolist() == [0] * 6 + [len(matrices)] * 2
    assert hub.get_scalar('train/loss_s2d').current() > 0


def test_s2d_refreshes_its_svd_every_interval_of_optimizer_steps():
    u, s, v = _matrix_with_singular_values([3.0, 1.0])
    w = nn.Parameter(u @ torch.diag(s) @ v.T)
    s2d = SelectiveSpectralDecay([w], svd_interval=3)
    calls = []
    real_refresh = s2d.refresh
    s2d.refresh = lambda: calls.append(s2d.steps) or real_refresh()
    for _ in range(7):
        s2d.penalty()  # two backward passes per step (accumulation)
        s2d.penalty()
        s2d.step_done()
    assert calls == [0, 3, 6]


@pytest.mark.parametrize('kwargs,message', [
    (dict(tau=0), r'tau must be in \(0, 1\]'),
    (dict(tau=1.5), r'tau must be in \(0, 1\]'),
    (dict(max_rank=0), 'max_rank must be an integer >= 1'),
    (dict(power=-1), 'power must be >= 0'),
    (dict(svd_interval=0), 'svd_interval must be an integer >= 1'),
    (dict(strength=-1), 'strength must be >= 0'),
])
def test_s2d_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelectiveSpectralDecay([nn.Parameter(torch.ones(2, 2))], **kwargs)


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
                'cd_update_norm', 'loss_s2d', 'loss_tweo'):
        assert key in log, key
    scalars = open(glob.glob(osp.join(tmp_path, '*', 'vis_data',
                                      'scalars.json'))[0]).read()
    assert 'cd_align_ffn_mean' in scalars


def test_s2d_options_fail_when_the_wrapper_is_built():
    from mmengine.optim import build_optim_wrapper
    for s2d, message in ((dict(tau=2.0), 'tau must be in'),
                         (dict(rank=3), r"s2d: unknown option\(s\) \['rank'\]; "
                          r"allowed: \['max_rank', 'power'")):
        with pytest.raises(ValueError, match=message):
            build_optim_wrapper(nn.Linear(2, 2), dict(
                type='ColinearityDecayOptimWrapper',
                optimizer=dict(type='SGD', lr=0.1), s2d=s2d))
