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
from mmcd.core.quant.learned_step import LearnedStepQuantizer
from mmcd.core.quant.qdq import to_qdq
from mmcd.core.quant.reconstruction import (AdaRoundQuantizer,
                                            ReconstructionConfig,
                                            _mix, reconstruct,
                                            reconstruction_units)
from mmcd.core.quant.reconstruction_losses import lp_channel_loss


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
    torch.testing.assert_close(lp_channel_loss(a, b), expected)
    tokens_a, tokens_b = torch.randn(2, 7, 3), torch.randn(2, 7, 3)
    both = lp_channel_loss((a, (tokens_a, (1, 2))), (b, (tokens_b, 0)))
    torch.testing.assert_close(
        both, expected + (tokens_a - tokens_b).square().sum(-1).mean())


def test_learned_step_round_trip_is_exact():
    q = UniformQuantizer(4, None, 'minmax')
    x = torch.randn(1000) * 3
    q.set_state('calib')
    q(x)
    q.zero_point = q.zero_point + 0.37  # a fractional zero point (RepQ-ViT)
    back = LearnedStepQuantizer(q).as_uniform()
    torch.testing.assert_close(back(x), q(x))


@pytest.mark.parametrize('zero', [0., 5., 8.])
def test_learned_step_equals_pytorchs_learnable_fake_quant(zero):
    """Output and gradients against PyTorch's learnable per-tensor fake
    quantization with the zero point not learned (what QDrop's
    LSQFakeQuantize calls, with its grad factor 1 / sqrt(N L)); the zero
    point stays fixed, the step is kept positive."""
    q = UniformQuantizer(4, None, 'minmax')
    q.set_params(torch.tensor(0.37), torch.tensor(zero))
    stepped = LearnedStepQuantizer(q)
    x = (torch.randn(500, dtype=torch.float64) * 3).requires_grad_()
    out = stepped(x.float())
    weights = torch.linspace(-1, 2, 500)
    (out * weights).sum().backward()
    ref_x = x.detach().float().requires_grad_()
    ref_scale = torch.tensor([0.37], requires_grad=True)
    ref = torch._fake_quantize_learnable_per_tensor_affine(
        ref_x, ref_scale, torch.tensor([zero]), 0, 15,
        1 / math.sqrt(500 * 15))
    (ref * weights).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad.float(), ref_x.grad)
    torch.testing.assert_close(stepped.step.grad.reshape(1), ref_scale.grad)
    assert float(stepped.zero_point) == zero
    with torch.no_grad():
        stepped.step.fill_(-0.5)
    stepped(x.float())
    assert float(stepped.step.detach()) == 0.5


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


def test_per_head_learned_step_equals_pytorchs_per_channel_fake_quant():
    """One step per channel (axis 1, the per-head grids): output and
    gradients against PyTorch's learnable per-channel fake quantization
    (QDrop's per-channel LSQFakeQuantize, grad factor 1 / sqrt(N / C L))."""
    q = UniformQuantizer(4, 1, 'minmax')
    scale, zero = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([3., 8., 0.])
    q.set_params(scale, zero)
    stepped = LearnedStepQuantizer(q)
    x = (torch.randn(2, 3, 4, 5) * 2).requires_grad_()
    weights = torch.linspace(-1, 2, x.numel()).view(x.shape)
    (stepped(x) * weights).sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    ref_scale = scale.clone().requires_grad_()
    ref = torch._fake_quantize_learnable_per_channel_affine(
        ref_x, ref_scale, zero, 1, 0, 15, 1 / math.sqrt(40 * 15))
    (ref * weights).sum().backward()
    torch.testing.assert_close(stepped(x.detach()), ref.detach())
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(stepped.step.grad, ref_scale.grad)
    back = stepped.as_uniform()
    assert back.channel_axis == 1
    torch.testing.assert_close(back(x.detach()), q(x.detach()))


def test_reconstruction_lowers_every_units_error_and_exports_bit_exact():
    net, quantized, x = calibrated_net()
    units = reconstruction_units(quantized, [r'blocks\.\d+'])
    assert units == ['blocks.0', 'blocks.1']
    error_before = float((quantized(x) - net(x)).square().mean())
    cfg = ReconstructionConfig(iters=300, batch_size=16, weight_lr=1e-2,
                               act_lr=1e-3)
    calibrated = {n: (float(q.scale), float(q.zero_point))
                  for n, q in quantized.named_modules()
                  if n.startswith('blocks.') and n.endswith('input_quantizer')}
    stats = reconstruct(quantized, net, lambda m: m(x), units, cfg)
    for n, (scale, zero) in calibrated.items():  # steps learned, zeros kept
        q = quantized.get_submodule(n)
        assert isinstance(q, UniformQuantizer) and q.state == 'quant'
        assert float(q.zero_point) == zero and float(q.scale) != scale, n
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


@pytest.mark.parametrize('profile', ['tensorrt', 'onnxruntime-integer'])
def test_reconstruction_keeps_a_profiles_integer_grids(profile):
    """Learned steps keep the calibrated zero points: under TensorRT's
    profile every exported activation grid is signed with zero point 0,
    under the integer onnxruntime profile every zero point an integer, and
    no quantizer needs the fractional-zero float formula."""
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(64, 10, 8)
    cfg = QuantConfig(8, 8, 'qdrop', profile=profile,
                      reconstruction=dict(iters=30, batch_size=16,
                                          act_lr=1e-2))
    quantized = quantize_model(copy.deepcopy(net), cfg)
    calibrate(quantized, cfg, lambda: quantized(x))
    before = {n: float(q.scale) for n, q in quantized.named_modules()
              if n.startswith('blocks.') and n.endswith('input_quantizer')}
    reconstruct(quantized, net, lambda m: m(x), ['blocks.0', 'blocks.1'],
                cfg.reconstruction_config())
    assert any(float(quantized.get_submodule(n).scale) != s
               for n, s in before.items())  # the steps moved
    report = to_qdq(quantized, profile)
    assert report['fractional_zero'] == [] and report['qdq']
    for name in report['qdq']:
        qdq = quantized.get_submodule(name)
        if profile == 'tensorrt':
            assert qdq.signed and torch.all(qdq.zero_point == 0), name
        else:
            assert torch.equal(qdq.zero_point, qdq.zero_point.round()), name


@pytest.mark.parametrize('order', ['in_turn', 'random'])
def test_in_turn_order_trains_on_images_in_recording_order(order):
    """APHQ-ViT's order: step ``it`` trains on image ``it mod N`` (seen
    through the unit's input, a mix of that image's quantized-prefix and
    float inputs: nearest to its float input); QDrop's draws at random."""
    net, quantized, x = calibrated_net()
    float_in = []
    net.blocks[0].register_forward_pre_hook(
        lambda m, args: float_in.append(args[0].detach()))
    net(x)
    seen = []
    quantized.blocks[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach())
        if args[0].shape[0] == 1 else None)
    reconstruct(quantized, net, lambda m: m(x), ['blocks.0'],
                ReconstructionConfig(iters=6, order=order))
    nearest = [int((float_in[0] - s).flatten(1).norm(dim=1).argmin())
               for s in seen]
    assert (nearest == [0, 1, 2, 3, 4, 5]) == (order == 'in_turn')


def test_bad_reconstruction_options_and_a_nan_loss():
    for options, message in [
            (dict(order='sorted'), "order must be one of \\('random', "
             "'in_turn'\\), got 'sorted'"),
            (dict(iters=0), 'iters must be an integer >= 1'),
            (dict(batch_size=0), 'batch_size must be an integer >= 1'),
            (dict(drop_prob=0), r'drop_prob .* must be in \(0, 1\]'),
            (dict(warmup=1.0), r'warmup must be in \[0, 1\)'),
            (dict(num_images=0), 'num_images must be an integer >= 1'),
            (dict(chunk_images=0), 'chunk_images must be an integer >= 1')]:
        with pytest.raises(ValueError, match=message):
            ReconstructionConfig(**options)
    with pytest.raises(ValueError, match='needs a calibrated per-channel'):
        AdaRoundQuantizer(UniformQuantizer(4, 0), torch.zeros(2, 2))
    net, quantized, x = calibrated_net()
    with pytest.raises(FloatingPointError, match=r'reconstruction of '
                       r'blocks\.0: the loss is nan at iteration 1'):
        reconstruct(quantized, net, lambda m: m(x * float('nan')),
                    ['blocks.0'], ReconstructionConfig(iters=5))
    with pytest.raises(ValueError, match='batch_size 65 is larger than the '
                       '64 reconstruction images'):
        reconstruct(quantized, net, lambda m: m(x), ['blocks.0'],
                    ReconstructionConfig(iters=1, batch_size=65))
    with pytest.warns(UserWarning, match=r'blocks\.0\.norm has no quantized '
                      'weight or learnable step; left as calibrated'):
        stats = reconstruct(quantized, net, lambda m: m(x),
                            ['blocks.0.norm'], ReconstructionConfig(iters=5))
    assert stats['blocks.0.norm']['loss_after'] == \
        stats['blocks.0.norm']['loss_before']


def test_reconstruction_through_tools_test(micro_run, tmp_path):
    """``aphq-vit`` with shortened reconstruction options, through the PTQ
    hook of tools/test.py: every MLP made ReLU and fine-tuned first, then
    every unit of the toy Swin detector (patch embedding, blocks, patch
    merging, neck) reconstructed in model order with the APH loss (the RPN
    objective's sensitivity), the stats logged and saved; the units' data
    recorded 4 images at a time (chunks of 4 and 2) in a disk cache that is
    empty afterwards; each per-head matmul search of the calibration logged
    with the time left; an unknown option fails naming the allowed ones."""
    import json
    import sys

    from conftest import run_bounded
    config, ckpt = micro_run
    hook = dict(type='PostTrainingQuantHook', w_bits=4, a_bits=4,
                method='aphq-vit', calib=dict(num_images=4),
                reconstruction=dict(iters=4, batch_size=2, num_images=6,
                                    mlp_iters=3, chunk_images=4,
                                    cache_dir=str(tmp_path / 'cache')))
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
    mlps = [f'{u}.ffn' for u in units if '.blocks.' in u]
    log = '\n'.join(line for line in out.splitlines() if 'PTQ' in line)
    memory = f'(recorded 4 at a time, cached in {tmp_path / "cache"})'
    assert 'PTQ: MLP reconstruction (GELU -> ReLU) of 5 MLPs on 6 images ' \
        f'{memory}' in out, log
    assert list((tmp_path / 'cache').iterdir()) == []
    for k, name in enumerate(mlps):
        assert f'PTQ: MLP [{k + 1}/5] {name}: loss' in out
    assert 'PTQ: calibrated on 4 images' in out
    for k, name in enumerate(n for u in units if '.blocks.' in u
                             for n in (f'{u}.attn.w_msa.qk_matmul',
                                       f'{u}.attn.w_msa.av_matmul')):
        assert f'PTQ: matmul search [{k + 1}/10] {name}: ' in out, log
    assert f"PTQ: reconstructing 10 units on 6 images {memory}, 4 " \
        "iterations each, batch 2, loss 'aph', drop_prob 0.5, input_prob " \
        "0.5" in out
    for k, name in enumerate(units):
        assert f'PTQ: block [{k + 1}/10] {name}: output error' in out
    results = json.load(open(tmp_path / 'work' / 'quant_results.json'))
    assert list(results['reconstruction_stats']) == units
    assert list(results['mlp_reconstruction_stats']) == mlps
    assert {k: results['reconstruction'][k] for k in (
        'iters', 'batch_size', 'num_images', 'mlp_iters', 'loss', 'mlp')} \
        == dict(iters=4, batch_size=2, num_images=6, mlp_iters=3,
                loss='aph', mlp=True)
    hook['reconstruction'] = dict(iterations=4)
    path.write_text(f'_base_ = {config!r}\ncustom_hooks = [{hook!r}]\n')
    code, out = run_bounded(
        [sys.executable, 'tools/test.py', str(path), ckpt, '--work-dir',
         str(tmp_path / 'work2')], timeout=300)
    assert code != 0
    assert "reconstruction: unknown option(s) ['iterations']; allowed:" in out


def test_a_saved_quantized_state_restores_bit_exactly():
    """A calibrated, partly reconstructed model restored from its state dict
    into a freshly converted copy computes the same, bit for bit; the
    rounding variables' layers get AdaRound quantizers back."""
    from mmcd.core.quant.saved_state import restore_quantized
    net, quantized, x = calibrated_net()
    reconstruct(quantized, net, lambda m: m(x), ['blocks.0'],
                ReconstructionConfig(iters=20, batch_size=8))
    expected = quantized(x)
    cfg = QuantConfig(3, 3, 'minmax', first_layer_bits=3)
    fresh = quantize_model(copy.deepcopy(net), cfg)
    on = restore_quantized(fresh, quantized.state_dict())
    assert on == sum(q.calibrated for q in quantized.modules()
                     if hasattr(q, 'calibrated') and
                     isinstance(q, UniformQuantizer))
    assert isinstance(fresh.blocks[0].fc1.weight_quantizer,
                      AdaRoundQuantizer)
    assert not isinstance(fresh.blocks[1].fc1.weight_quantizer,
                          AdaRoundQuantizer)
    assert torch.equal(fresh(x), expected)
    with pytest.raises(RuntimeError, match='Unexpected key'):
        restore_quantized(quantize_model(copy.deepcopy(net), cfg),
                          dict(quantized.state_dict(), extra=torch.ones(1)))


def test_quantized_checkpoint_refuses_other_settings(tmp_path):
    from mmengine.config import ConfigDict

    from mmcd.core import ConfigError
    from mmcd.engine.quantized_checkpoint import (check_meta, load_quantized,
                                                  make_meta, save_quantized)
    net, quantized, _ = calibrated_net()
    cfg = QuantConfig(3, 3, 'minmax', first_layer_bits=3)
    model_cfg = ConfigDict(type='Net', depth=2)
    meta = make_meta(cfg, model_cfg, 64, '/float.pth', ['blocks.0'])
    path = str(tmp_path / 'q.pth')
    save_quantized(path, quantized, meta)
    loaded, state = load_quantized(path)
    assert loaded['units_done'] == [] and set(state) == set(
        quantized.state_dict())
    check_meta(loaded, cfg, model_cfg, path, complete=False)
    with pytest.raises(ConfigError, match=r"was quantized with other "
                       r"settings: w_bits 3 \(here 4\); a_bits 3 \(here 4\)"
                       r"; method 'minmax' \(here 'repq-vit'\)"):
        check_meta(loaded, QuantConfig(4, 4, 'repq-vit', first_layer_bits=3),
                   model_cfg, path)
    with pytest.raises(ConfigError, match='the detector config'):
        check_meta(loaded, cfg, ConfigDict(type='Net', depth=3), path)
    with pytest.raises(ConfigError, match=r"profile 'onnxruntime' \(here "
                       r"'tensorrt'\)"):
        check_meta(loaded, QuantConfig(8, 8, 'minmax', first_layer_bits=3,
                                       profile='tensorrt'),
                   model_cfg, path)
    # where the reconstruction's data lives does not tie the file
    recon = QuantConfig(3, 3, 'minmax', first_layer_bits=3,
                        reconstruction=dict(iters=2, chunk_images=1,
                                            cache_dir='/tmp/a'))
    check_meta(make_meta(recon, model_cfg, 64, '/float.pth', []),
               QuantConfig(3, 3, 'minmax', first_layer_bits=3,
                           reconstruction=dict(iters=2)), model_cfg, path)
    # a file written before profiles existed has the default one
    del loaded['settings']['profile']
    check_meta(loaded, cfg, model_cfg, path, complete=False)
    with pytest.raises(ConfigError, match=r'stopped after 0 of 1 units'):
        check_meta(loaded, cfg, model_cfg, path)
    torch.save(quantized.state_dict(), tmp_path / 'float.pth')
    with pytest.raises(ConfigError, match='not a quantized checkpoint '
                       'written by tools/quantize.py'):
        load_quantized(str(tmp_path / 'float.pth'))


@pytest.mark.slow
def test_quantize_tool_resumes_and_test_tool_evaluates_the_file(
        micro_run, tmp_path):
    """tools/quantize.py stopped after two units and run again ends with the
    same file as an uninterrupted run; tools/test.py --quant-checkpoint
    gives the metrics of calibrating and reconstructing in the run; the
    export tool loads the file (and refuses a --method beside it)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, run_bounded
    config, ckpt = micro_run
    quantize = [sys.executable, 'tools/quantize.py', config, ckpt, '--quant',
                'w4a4', '--calib-images', '4', '--reconstruction', 'iters=3',
                'batch_size=2']
    whole, part = str(tmp_path / 'whole.pth'), str(tmp_path / 'part.pth')
    code, out = run_bounded(quantize + ['--out', whole], timeout=300)
    assert code == 0, out[-3000:]
    proc = subprocess.Popen(quantize + ['--out', part], cwd=REPO,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, done = time.time() + 240, []
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            done = torch.load(part, weights_only=True)['meta']['units_done']
        except Exception:
            continue
        if len(done) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert 2 <= len(done) < 10  # stopped in the middle
    code, out = run_bounded(quantize + ['--out', part], timeout=300)
    assert code == 0 and 'quantize: resuming' in out, out[-3000:]
    a = torch.load(whole, weights_only=True)
    b = torch.load(part, weights_only=True)
    assert a['meta']['units_done'] == b['meta']['units_done']
    assert all(torch.equal(a['state_dict'][k], b['state_dict'][k])
               for k in a['state_dict'])
    metrics = []
    for extra in (['--quant-checkpoint', whole],
                  ['--quant', 'w4a4', '--calib-images', '4']):
        work = tmp_path / f'test{len(metrics)}'
        if extra[0] == '--quant':  # the same settings, calibrated in-run
            hook = dict(type='PostTrainingQuantHook', w_bits=4, a_bits=4,
                        method='repq-vit', calib=dict(num_images=4),
                        reconstruction=dict(iters=3, batch_size=2))
            path = tmp_path / 'inrun.py'
            path.write_text(f'_base_ = {config!r}\ncustom_hooks = '
                            f'[{hook!r}]\n')
            cmd = [sys.executable, 'tools/test.py', str(path), ckpt]
        else:
            cmd = [sys.executable, 'tools/test.py', config, ckpt, *extra]
        code, out = run_bounded(cmd + ['--work-dir', str(work)], timeout=300)
        assert code == 0, out[-3000:]
        metrics.append(json.load(open(work / 'test_metrics.json'))['metrics'])
    assert metrics[0] == metrics[1]
    code, out = run_bounded([sys.executable, 'tools/test.py', config, ckpt,
                             '--quant', 'w4a4', '--quant-checkpoint', whole],
                            timeout=120)
    assert code != 0 and out.strip().splitlines()[-1].startswith(
        'error: --quant calibrates, --quant-checkpoint loads')
    code, out = run_bounded([sys.executable, 'tools/test.py', config, ckpt,
                             '--calib-images', '8', '--quant-checkpoint',
                             whole], timeout=120)
    assert code != 0 and out.strip().splitlines()[-1].startswith(
        'error: --layer-bits, --calib-images and --quant-profile are '
        'settings of the')
    export = [sys.executable, 'tools/deploy/export_onnx.py', config, ckpt,
              '--quant-checkpoint', whole, '--out-dir', str(tmp_path / 'onnx')]
    code, out = run_bounded(export, timeout=300)
    assert code == 0, out[-3000:]
    assert f'PTQ: loaded {whole} (W4A4 repq-vit + reconstruction' in out
    assert any(name.startswith('w4a4_repq-vit_') and name.endswith('.onnx')
               for name in os.listdir(tmp_path / 'onnx')), out[-2000:]
    code, out = run_bounded(export + ['--method', 'qdrop'], timeout=120)
    assert code != 0 and out.strip().splitlines()[-1] == (
        'error: --method: settings of the quantized checkpoint '
        '(tools/quantize.py), not of --quant-checkpoint')
