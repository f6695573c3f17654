"""PTQ core: quantizer grids against hand-computed values, RepQ-ViT
reparameterization equivalence, quantization-aware Swin attention, model
conversion rules and errors."""
import copy

import pytest
import torch
from torch import nn

from mmcd.core.quant import (LogSqrt2Quantizer, QuantConfig, QuantLinear,
                             QuantWindowMSA, TanQuantizer, UniformQuantizer,
                             calibrate, quantize_model, reparameterize,
                             target_params)
from mmcd.core.quant.convert import fake_quantizers


def _calibrated(q, data=None, weight=None):
    """Calibrate as the model does: weights from the weight, activations on
    the first tensor through the quantizer in 'calib' state."""
    if weight is not None:
        q.finalize(weight)
        q.set_state('quant')
    else:
        q.set_state('calib')
        q(data)
        assert q.state == 'quant'
    return q


def test_uniform_quantizer_hand_computed():
    q = _calibrated(UniformQuantizer(2), torch.tensor([-1.0, 2.0]))
    assert q.scale.item() == pytest.approx(1.0)
    assert q.zero_point.item() == 1
    x = torch.tensor([-1.4, -0.6, 0.4, 1.6, 2.7])
    torch.testing.assert_close(q(x), torch.tensor([-1.0, -1.0, 0.0, 2.0,
                                                   2.0]))
    # error bound inside the range: half a step
    q8 = _calibrated(UniformQuantizer(8), torch.tensor([-3.0, 5.0]))
    x = torch.linspace(-3, 5, 1001)
    assert (q8(x) - x).abs().max() <= q8.scale / 2 + 1e-6
    assert q8(torch.zeros(1)).item() == 0  # zero is exact


def test_uniform_per_channel_weights():
    w = torch.tensor([[0.0, 1.0, -1.0], [0.0, 10.0, -10.0]])
    q = _calibrated(UniformQuantizer(4, channel_axis=0), weight=w)
    torch.testing.assert_close(q.scale, torch.tensor([2 / 15, 20 / 15]))
    assert (q(w) - w).abs()[0].max() <= 1 / 15 + 1e-6


def test_quantile_mse_search_clips_an_outlier():
    torch.manual_seed(0)
    data = torch.randn(100_000)
    data[:5] = 40.0  # a few outliers stretch the min-max range
    minmax = _calibrated(UniformQuantizer(4), data)
    mse = _calibrated(UniformQuantizer(4, search='quantile'), data)
    assert mse.scale < minmax.scale / 4
    assert (mse(data) - data).square().mean() < \
        (minmax(data) - data).square().mean() / 4


def test_log_sqrt2_grid():
    # more than 0.1% of the values at 1: every quantile candidate is 1
    q = _calibrated(LogSqrt2Quantizer(3), torch.cat([torch.ones(100),
                                                     torch.rand(1000)]))
    assert q.delta.item() == 1.0
    x = torch.tensor([1.0, 0.5, 0.7, 0.25, 0.01, 0.0, 3.0])
    expected = torch.tensor([1.0, 0.5, 2**-0.5, 0.25, 0.0, 0.0, 1.0])
    torch.testing.assert_close(q(x), expected)
    # the 8 levels are exactly (sqrt 2)^-q, q = 0..7
    levels = torch.tensor([2**(-k / 2) for k in range(8)])
    torch.testing.assert_close(q(levels), levels)


def test_tan_quantizer_grid():
    torch.manual_seed(0)
    # attention-like data (mass near 0 and near 1): TanQ beats uniform
    data = torch.cat([torch.rand(5000) * 0.05, 1 - torch.rand(500) * 0.05])
    tan = _calibrated(TanQuantizer(4), data)
    uni = _calibrated(UniformQuantizer(4), data)
    assert float(tan.tau) > 1
    assert (tan(data) - data).square().mean() < \
        (uni(data) - data).square().mean() / 2
    delta = float(tan.delta)
    for tau in TanQuantizer.TAUS:
        grid = tan.levels_of(tau, delta).float()
        gaps = grid.diff()
        assert gaps[0] < gaps[7] and gaps[-1] < gaps[7]
        assert grid[0] == 0 and grid[-1] == pytest.approx(delta)
        tan.tau.fill_(tau)
        torch.testing.assert_close(tan(grid), grid)  # levels are fixed points


@pytest.mark.parametrize('bits', [1, 9, 4.0])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match='2..8'):
        UniformQuantizer(bits)
    with pytest.raises(ValueError, match='2..8'):
        QuantConfig(w_bits=bits)


def test_quant_state_needs_calibration():
    with pytest.raises(RuntimeError, match='not calibrated'):
        UniformQuantizer(4).set_state('quant')


def test_target_params_are_repq_vits_means():
    scale = torch.tensor([1.0, 1.1, 0.9, 1.0, 50.0])
    zero = torch.tensor([3.0, 4.0, 3.0, 4.0, 3.0])
    s_mean, z_mean = target_params(scale, zero)
    assert s_mean.item() == pytest.approx(10.8)
    assert z_mean.item() == pytest.approx(3.4)  # RepQ-ViT does not round


def reparameterized_pair(target_of=None, bits=4):
    """A LayerNorm -> QuantLinear in float64 with 3 outlier channels,
    reparameterized (optionally with the target ``target_of(s_c, z_c)``) and
    its weight quantized again; returns the quantized function."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(16).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) + 0.5)
        norm.weight[:3] *= 30
        norm.bias.copy_(torch.randn(16))
    linear = QuantLinear.from_float(nn.Linear(16, 8).double(), bits, bits,
                                    'repq-vit')
    x = torch.randn(256, 16, dtype=torch.float64)
    y = norm(x)
    scale_c, zero_c = linear.input_quantizer.params_for_range(
        y.amin(0), y.amax(0))
    target = None if target_of is None else target_of(scale_c, zero_c)
    reparameterize(norm, linear, scale_c, zero_c, target)
    linear.finalize_weight()
    return lambda: linear(norm(x)).detach()


def test_reparameterization_is_exact_in_fp():
    torch.manual_seed(0)
    norm = nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) * 5)
        norm.bias.copy_(torch.randn(16))
    linear = QuantLinear.from_float(nn.Linear(16, 8), 4, 4, 'repq-vit')
    x = torch.randn(64, 16) * torch.linspace(0.1, 10, 16)
    before = linear(norm(x))
    y = norm(x)
    scale_c, zero_c = linear.input_quantizer.params_for_range(
        y.amin(0), y.amax(0))
    out = reparameterize(norm, linear, scale_c, zero_c)
    assert linear.input_quantizer.state == 'quant'  # the target grid
    linear.input_quantizer.set_state('fp')
    torch.testing.assert_close(linear(norm(x)), before, rtol=1e-5,
                               atol=1e-5)
    # r and t follow the formulas
    torch.testing.assert_close(out['r'], scale_c / scale_c.mean())
    torch.testing.assert_close(out['t'], scale_c.mean() * (
        zero_c - zero_c.mean()))
    # the rewritten activation has per-channel ranges aligned on one grid
    y_new = norm(x) + out['t']
    span = (y_new.amax(0) - y_new.amin(0)) / (y.amax(0) - y.amin(0))
    torch.testing.assert_close(span, 1 / out['r'], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('bits', [4, 6])
def test_target_scale_cancels_in_the_quantized_function(bits):
    """Why DopQ-ViT's MOSF is not a separate target (reparam.py): any
    per-tensor target scale gives RepQ-ViT's quantized output, only the
    zero point's fraction acts."""
    mean_target = reparameterized_pair(bits=bits)()
    for factor in (0.2, 7.3):
        other = reparameterized_pair(
            lambda s, z: (factor * s.mean(), z.mean()), bits)()
        torch.testing.assert_close(other, mean_target, rtol=1e-12,
                                   atol=1e-12)
    shifted = reparameterized_pair(lambda s, z: (s.mean(), z.mean() + 0.5),
                                   bits)()
    assert (shifted - mean_target).abs().max() > 1e-3


@pytest.mark.parametrize('size,shift', [((14, 14), 0), ((11, 17), 3)])
def test_quant_window_msa_matches_mmdet_in_fp(size, shift):
    from mmdet.models.backbones.swin import ShiftWindowMSA
    torch.manual_seed(0)
    attn = ShiftWindowMSA(embed_dims=32, num_heads=4, window_size=7,
                          shift_size=shift)
    nn.init.normal_(attn.w_msa.relative_position_bias_table, std=0.5)
    attn.eval()
    x = torch.randn(2, size[0] * size[1], 32)
    ref = attn(x, size)
    qattn = copy.deepcopy(attn)
    qattn.w_msa = QuantWindowMSA(qattn.w_msa, 4, 'repq-vit')
    torch.testing.assert_close(qattn(x, size), ref, rtol=1e-6, atol=1e-6)
    names = {n for n, _ in qattn.named_parameters()}
    assert names == {n for n, _ in attn.named_parameters()}


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.patch_embed = nn.Conv2d(3, 8, 2, 2)
        self.backbone.fc = nn.Linear(8, 8)
        self.head = nn.Module()
        self.head.conv = nn.Conv2d(8, 4, 1)
        self.head.up = nn.ConvTranspose2d(4, 4, 2, 2)

    def forward(self, x):
        x = self.backbone.patch_embed(x)
        x = self.backbone.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head.up(self.head.conv(x))


def test_conversion_rules_and_calibration():
    torch.manual_seed(0)
    net = TinyNet()
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    q = quantize_model(copy.deepcopy(net), QuantConfig(8, 8, 'minmax'))
    assert isinstance(q.backbone.fc, QuantLinear)
    assert type(q.head.up) is nn.ConvTranspose2d  # stays in FP
    assert q.backbone.patch_embed.input_quantizer.bits == 8
    torch.testing.assert_close(q(x), ref)  # 'fp' state: unchanged
    calibrate(q, QuantConfig(8, 8, 'minmax'), lambda: q(x))
    out = q(x)
    assert not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 0.05
    torch.testing.assert_close(q.backbone.fc.weight, net.backbone.fc.weight)
    with pytest.raises(ValueError, match='already quantized'):
        quantize_model(q, QuantConfig())
    only_backbone = quantize_model(copy.deepcopy(net),
                                   QuantConfig(4, 4, scope='backbone'))
    assert type(only_backbone.head.conv) is nn.Conv2d
    skipped = quantize_model(copy.deepcopy(net),
                             QuantConfig(skip=[r'backbone\.fc']))
    assert type(skipped.backbone.fc) is nn.Linear


class InlineAttention(nn.Module):
    """Attention with its matmuls inline and no registered twin."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def test_unknown_attention_and_method():
    net = TinyNet()
    net.head.attn = InlineAttention()
    with pytest.raises(ValueError, match=r'head\.attn \(InlineAttention'
                       r'\).*Register a quantized twin of InlineAttention '
                       r'in mmcd.core.quant.QUANTIZED_MODULES'):
        quantize_model(net, QuantConfig())
    with pytest.raises(ValueError, match='unknown quantization method'):
        QuantConfig(method='gptq')
    assert len(fake_quantizers(quantize_model(TinyNet(), QuantConfig()))) == 6
