"""Block reconstruction (AdaRound, learned steps, QDrop) against formulas
written from the papers and QDrop's public code, on small tensors; a short
reconstruction lowering every unit's output error; the QDQ export carrying
the learned rounding bit for bit; bad options."""
import copy
import math

import pytest
import torch
from torch import nn

from mmcd.core.quant import (QuantConfig, UniformQuantizer, calibrate,
                             quantize_model)
from mmcd.core.quant.qdq import to_qdq
from mmcd.core.quant.reconstruction import (AdaRoundQuantizer,
                                            ReconstructionConfig, _lsq_from,
                                            _mix, _to_uniform, reconstruct,
                                            reconstruction_loss,
                                            reconstruction_units)


def weight_grid(w, bits=3):
    q = UniformQuantizer(bits, 0, 'minmax')
    q.finalize(w)
    return q


def test_adaround_starts_at_the_float_weight_and_rounds_by_the_sign():
    torch.manual_seed(0)
    w = torch.randn(4, 6, dtype=torch.float64)
    grid = weight_grid(w)
    rounder = AdaRoundQuantizer(grid, w)
    s, z = grid.scale[:, None], grid.zero_point[:, None]
    # h(V) = clamp(1.2 sigmoid(V) - 0.1, 0, 1) = frac(w / s) at the start
    h = (1.2 * torch.sigmoid(rounder.alpha) - 0.1).clamp(0, 1)
    torch.testing.assert_close(h, w / s - torch.floor(w / s))
    inside = (torch.floor(w / s) + h + z >= 0) & (
        torch.floor(w / s) + h + z <= 7)
    torch.testing.assert_close(rounder.quantize(w)[inside], w[inside])
    with torch.no_grad():
        rounder.alpha.copy_(torch.tensor([-3.0, 0.0, 2.0, 100.0, -100.0,
                                          0.5]).repeat(4, 1))
    rounder.harden()
    up = torch.tensor([0., 1, 1, 1, 0, 1]).repeat(4, 1)
    codes = torch.clamp(torch.floor(w / s) + up + z, 0, 7)
    assert torch.equal(rounder.codes(w), codes)
    assert torch.equal(rounder.quantize(w), (codes - z) * s)


def test_rounding_regulariser_and_beta_schedule_by_hand():
    grid = weight_grid(torch.randn(2, 3))
    rounder = AdaRoundQuantizer(grid, torch.zeros(2, 3))
    # sigmoid(V) = 1/12 -> h = 0; sigmoid(V) = 0.5 -> h = 0.5;
    # sigmoid(V) = 11/12 -> h = 1
    with torch.no_grad():
        rounder.alpha.copy_(torch.tensor([[-math.log(11), 0.0, math.log(11)],
                                          [0.0, 0.0, -math.log(11)]]))
    # 1 - |2h - 1|^beta: 0 at h in {0, 1}, 1 at h = 1/2 (three of them)
    assert float(rounder.regularizer(20.0).detach()) == pytest.approx(3.0)
    with torch.no_grad():
        rounder.alpha.fill_(math.log(3))  # sigmoid = 3/4: h = 0.8
    assert float(rounder.regularizer(2.0).detach()) == pytest.approx(
        6 * (1 - 0.36))
    cfg = ReconstructionConfig(iters=100, warmup=0.2)
    # QDrop's LinearTempDecay: 20 until 20% of the iterations, then
    # 2 + 18 (1 - (t - 20) / 80)
    assert [cfg.beta_at(t) for t in (1, 19, 20, 60, 100)] == pytest.approx(
        [20, 20, 20, 11, 2])


def test_qdrop_mix_keeps_quantized_values_with_the_drop_probability():
    gen = torch.Generator().manual_seed(0)
    q, f = torch.ones(100_000), torch.zeros(100_000)
    assert float(_mix(q, f, 0.5, gen).mean()) == pytest.approx(0.5, abs=0.01)
    assert torch.equal(_mix(q, f, 1.0, gen), q)
    mixed = _mix((q[:10], (4, 4)), (f[:10], (4, 4)), 0.3, gen)
    assert mixed[1] == (4, 4)


def test_reconstruction_loss_is_qdrops_lp_loss():
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    # QDrop: (pred - tgt).abs().pow(p).sum(1).mean() for NCHW maps
    expected = (a - b).abs().pow(2).sum(1).mean()
    torch.testing.assert_close(reconstruction_loss(a, b), expected)
    tokens_a, tokens_b = torch.randn(2, 7, 3), torch.randn(2, 7, 3)
    both = reconstruction_loss((a, (tokens_a, (1, 2))), (b, (tokens_b, 0)))
    torch.testing.assert_close(
        both, expected + (tokens_a - tokens_b).square().sum(-1).mean())


def test_learned_step_round_trip_is_exact():
    q = UniformQuantizer(4, None, 'minmax')
    x = torch.randn(1000) * 3
    q.set_state('calib')
    q(x)
    q.zero_point = q.zero_point + 0.37  # a fractional zero point (RepQ-ViT)
    back = _to_uniform(_lsq_from(q), q)
    torch.testing.assert_close(back(x), q(x))


class Block(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x, scale=1.0):
        return x + scale * self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, x):
        return self.blocks(self.stem(x))


def calibrated_net(bits=3):
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(64, 10, 8)
    cfg = QuantConfig(bits, bits, 'minmax', first_layer_bits=bits)
    quantized = quantize_model(copy.deepcopy(net), cfg)
    calibrate(quantized, cfg, lambda: quantized(x))
    return net, quantized, x


def test_reconstruction_lowers_every_units_error_and_exports_bit_exact():
    net, quantized, x = calibrated_net()
    units = reconstruction_units(quantized, [r'blocks\.\d+'])
    assert units == ['blocks.0', 'blocks.1']
    error_before = float((quantized(x) - net(x)).square().mean())
    cfg = ReconstructionConfig(iters=300, batch_size=16, weight_lr=1e-2,
                               act_lr=1e-3)
    stats = reconstruct(quantized, net, lambda m: m(x), units, cfg)
    for name in units:
        assert stats[name]['loss_after'] < stats[name]['loss_before'], stats
        assert 0 < stats[name]['rounded_up'] < 1
    error_after = float((quantized(x) - net(x)).square().mean())
    assert error_after < error_before
    rounder = quantized.blocks[0].fc1.weight_quantizer
    assert isinstance(rounder, AdaRoundQuantizer) and not rounder.soft
    nearest = weight_grid(quantized.blocks[0].fc1.weight)
    nearest.set_params(rounder.scale, rounder.zero_point)
    assert not torch.equal(rounder.codes(quantized.blocks[0].fc1.weight),
                           nearest.codes(quantized.blocks[0].fc1.weight))
    expected = quantized(x)
    to_qdq(quantized)
    assert torch.equal(quantized(x), expected)  # the rounding, as integers


def test_bad_reconstruction_options_and_a_nan_loss():
    for options, message in [
            (dict(iters=0), 'iters must be an integer >= 1'),
            (dict(batch_size=0), 'batch_size must be an integer >= 1'),
            (dict(drop_prob=0), r'drop_prob .* must be in \(0, 1\]'),
            (dict(warmup=1.0), r'warmup must be in \[0, 1\)')]:
        with pytest.raises(ValueError, match=message):
            ReconstructionConfig(**options)
    with pytest.raises(ValueError, match='needs a calibrated per-channel'):
        AdaRoundQuantizer(UniformQuantizer(4, 0), torch.zeros(2, 2))
    net, quantized, x = calibrated_net()
    with pytest.raises(FloatingPointError, match=r'reconstruction of '
                       r'blocks\.0: the loss is nan at iteration 1'):
        reconstruct(quantized, net, lambda m: m(x * float('nan')),
                    ['blocks.0'], ReconstructionConfig(iters=5))


def test_reconstruction_through_tools_test(micro_run, tmp_path):
    """The PTQ hook's ``reconstruction`` option, through tools/test.py:
    every unit of the toy Swin detector (patch embedding, blocks, patch
    merging, neck) reconstructed in model order, its stats logged and
    saved; an unknown option fails naming the allowed ones."""
    import json
    import sys

    from conftest import run_bounded
    config, ckpt = micro_run
    hook = dict(type='PostTrainingQuantHook', w_bits=4, a_bits=4,
                method='repq-vit', calib=dict(num_images=4),
                reconstruction=dict(iters=4, batch_size=2))
    path = tmp_path / 'recon.py'
    path.write_text(f'_base_ = {config!r}\ncustom_hooks = [{hook!r}]\n')
    code, out = run_bounded(
        [sys.executable, 'tools/test.py', str(path), ckpt, '--work-dir',
         str(tmp_path / 'work')], timeout=300)
    assert code == 0, out[-3000:]
    units = ['backbone.patch_embed', 'backbone.stages.0.blocks.0',
             'backbone.stages.0.downsample', 'backbone.stages.1.blocks.0',
             'backbone.stages.1.downsample', 'backbone.stages.2.blocks.0',
             'backbone.stages.2.blocks.1', 'backbone.stages.2.downsample',
             'backbone.stages.3.blocks.0', 'neck']
    for k, name in enumerate(units):
        assert f'PTQ: [{k + 1}/10] {name}: output loss' in out
    results = json.load(open(tmp_path / 'work' / 'quant_results.json'))
    assert list(results['reconstruction_stats']) == units
    assert results['reconstruction'] == dict(iters=4, batch_size=2)
    hook['reconstruction'] = dict(iterations=4)
    path.write_text(f'_base_ = {config!r}\ncustom_hooks = [{hook!r}]\n')
    code, out = run_bounded(
        [sys.executable, 'tools/test.py', str(path), ckpt, '--work-dir',
         str(tmp_path / 'work2')], timeout=300)
    assert code != 0
    assert "reconstruction: unknown option(s) ['iterations']; allowed:" in out
