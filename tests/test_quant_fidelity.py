"""Every PTQ quantizer against the published formula, on small tensors whose
values can be checked by hand, and on the hard cases: heavy tails (Student-t,
df 2 and 3), outlier channels, 49-, 196- and 4096-token attention rows.

The references below are written from the papers' formulas and RepQ-ViT's
public code (torch.quantile, least MSE over the quantiles 0.999, 0.9999,
0.99999), independently of mmcd's implementation."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from mmcd.core.quant import (LogSqrt2Quantizer, QuantConfig, TanQuantizer,
                             UniformQuantizer, calibrate, quantize_model)
from mmcd.core.quant.methods import get_method
from mmcd.core.quant.quantizers import quantiles, subsample_columns

PS = (0.999, 0.9999, 0.99999)


def calibrated(q, data):
    q.set_state('calib')
    q(data)
    return q


# ---------------------------------------------------------- references --
def ref_uniform(x, bits, lo, hi):
    """RepQ-ViT's UniformQuantizer.quantize(x, max, min)."""
    delta = (hi - lo) / (2**bits - 1)
    zero = torch.round(-lo / delta)
    q = torch.clamp(torch.round(x / delta) + zero, 0, 2**bits - 1)
    return (q - zero) * delta


def ref_uniform_search(x, bits):
    """RepQ-ViT's activation range: least MSE among the quantiles."""
    flat = x.reshape(-1).double()
    best = None
    for p in PS:
        hi, lo = torch.quantile(flat, p), torch.quantile(flat, 1 - p)
        err = (ref_uniform(flat, bits, lo, hi) - flat).square().mean()
        if best is None or err < best[0]:
            best = (err, lo, hi)
    return best


def ref_log_sqrt2(x, bits, delta):
    """RepQ-ViT's LogSqrt2Quantizer.quantize(x, delta)."""
    x_int = torch.round(-1 * (x / delta).log2() * 2)
    mask = x_int >= 2**bits
    q = torch.clamp(x_int, 0, 2**bits - 1)
    odd = (q % 2) * (math.sqrt(2) - 1) + 1
    out = 2**(-1 * torch.ceil(q / 2)) * odd * delta
    out[mask] = 0
    return out


def ref_log_sqrt2_search(x, bits):
    flat = x.reshape(-1).double()
    best = None
    for p in PS:
        delta = torch.quantile(flat, p)
        err = (ref_log_sqrt2(flat, bits, delta) - flat).square().mean()
        if best is None or err < best[0]:
            best = (err, delta)
    return best


def ref_tanq(x, bits, delta, tau):
    """TanQ on [0, D] as formulated in mmcd's docs (DopQ-ViT's equations are
    not public to us): levels ``D l_k``, ``l_k = 1/2 + arctan(tau (2k/K -
    1)) / (2 arctan tau)``, and the cell of level ``k`` is bounded by the
    images of the half-integer codes ``k -+ 1/2`` under the same map, so a
    value takes the level of the cell it falls in (numpy, searchsorted)."""
    big_k, delta = 2**bits - 1, float(delta)

    def level(k):
        return delta * (0.5 + np.arctan(tau * (2 * k / big_k - 1)) /
                        (2 * np.arctan(tau)))

    boundaries = level(np.arange(big_k) + 0.5)
    values = np.clip(x.double().numpy(), 0, delta)
    codes = np.searchsorted(boundaries, values)
    return torch.from_numpy(level(codes.astype(np.float64)))


def heavy_tailed(kind, n=200_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == 'gaussian':
        return torch.randn(n, generator=gen)
    if kind.startswith('student'):
        df = float(kind[-1])
        normal = torch.randn(n, generator=gen)
        with torch.random.fork_rng():  # Chi2 samples from the global RNG
            torch.manual_seed(seed)
            chi2 = torch.distributions.Chi2(df).sample((n, ))
        return normal / (chi2 / df).sqrt()
    x = torch.randn(n // 64, 64, generator=gen)  # outlier channels
    x[:, :3] *= 60
    return x


# ------------------------------------------------------------- uniform --
def test_quantiles_are_torch_quantile():
    x = torch.randn(3, 5001, dtype=torch.float64)
    ps = [0.999, 0.9999, 0.99999, 0.001, 0.0001, 0.00001]
    torch.testing.assert_close(
        quantiles(x, ps),
        torch.quantile(x, torch.tensor(ps, dtype=torch.float64), dim=1))


def subsample_trap(n):
    """Large values exactly where the partial sort's subsample looks, small
    ones elsewhere: the subsample's threshold guess is too high."""
    x = torch.rand(n, dtype=torch.float64, generator=torch.Generator(
    ).manual_seed(1))
    x[subsample_columns(n)] += 1e6
    return x


def test_subsample_sees_every_channel_of_a_flattened_activation():
    """A ``[tokens, C]`` activation flattened to one row: the subsample
    falls in every channel, even where ``C`` divides ``N / 16384`` (an
    evenly strided one saw only channel 0 of Swin-T's FFN input)."""
    channels, length = 384, 384 * 16384 * 12
    seen = subsample_columns(length) % channels
    assert seen.unique().numel() == channels


@pytest.mark.parametrize('case', ['relu', 'negative-relu', 'trap', 'float32',
                                  'mixed-rows'])
def test_quantiles_of_long_rows_are_torch_quantile(case):
    """Rows past the partial-sort shortcut's threshold (65536 values): with
    ties at the tail (a ReLU's zeros), and with a subsample that misleads
    the shortcut, the quantiles stay exact."""
    x = heavy_tailed('student2', 300_000).double()
    x = {'relu': x.relu(), 'negative-relu': -x.relu(),
         'trap': subsample_trap(300_000), 'float32': x.float(),
         'mixed-rows': torch.stack([x, x.relu(), subsample_trap(300_000)])
         }[case].reshape(-1, 300_000)
    ps = [0.999, 0.9999, 0.99999, 0.001, 0.0001, 0.00001]
    # the reference in float64: torch.quantile of a float32 tensor rounds
    # the position p (N - 1) to float32 (0.03 apart at N = 3e5)
    expected = torch.quantile(x.double(), torch.tensor(
        ps, dtype=torch.float64), dim=1).to(x.dtype)
    tolerance = 0 if x.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(quantiles(x, ps), expected, rtol=tolerance,
                               atol=0)


def test_uniform_search_scores_every_value_of_a_long_tensor():
    """900k values, past one chunk of the streamed MSE (2^18): the same
    clip and MSE as the reference on the whole tensor."""
    x = heavy_tailed('student3', 900_000).relu()
    ref_err, ref_lo, ref_hi = ref_uniform_search(x, 4)
    q = calibrated(UniformQuantizer(4, search='quantile'), x.double())
    assert q.scale.item() == pytest.approx(float((ref_hi - ref_lo) / 15),
                                           rel=1e-9)
    err = (q(x.double()) - x.double()).square().mean()
    assert err.item() == pytest.approx(ref_err.item(), rel=1e-9)


@pytest.mark.parametrize('quantizer', ['uniform', 'channel-offset',
                                       'log-sqrt2', 'tanq'])
def test_quantize_in_chunks_equals_whole_tensor(quantizer):
    """Without autograd a long tensor is fake-quantized in chunks, a short
    one at once: the two agree to the bit."""
    x = heavy_tailed('student3', 600_000).reshape(-1, 60)
    if quantizer in ('log-sqrt2', 'tanq'):
        x = x.abs() / x.abs().amax()
        q = {'log-sqrt2': LogSqrt2Quantizer, 'tanq': TanQuantizer}[
            quantizer](4)
    else:
        q = UniformQuantizer(4, search='quantile')
    q = calibrated(q, x)
    if quantizer == 'channel-offset':
        q.set_params(q.scale, q.zero_point, torch.linspace(-1, 1, 60))
    with torch.no_grad():  # 600k values: in chunks of 2^18 ...
        chunked = q(x)
        # ... and 1000-row pieces (60k values), each quantized at once
        pieces = torch.cat([q(piece) for piece in x.split(1000)])
    assert torch.equal(chunked, pieces)


def test_uniform_quantile_search_by_hand():
    # 0, 1/N, ..., 1: the quantile at p is p itself
    n = 100_000
    x = torch.arange(n + 1, dtype=torch.float64) / n
    q = calibrated(UniformQuantizer(2, search='quantile'), x)
    # 4 levels: rounding error ~ s^2 / 12 dominates the clipping error, so
    # the narrowest clip, p = 0.999, wins: s = (0.999 - 0.001) / 3
    lo, hi = 1e-3, 1 - 1e-3
    assert q.scale.item() == pytest.approx((hi - lo) / 3)
    assert q.zero_point.item() == 0  # round(-0.001 / 0.33)
    # levels (k - 0) * s, k = 0..3
    got = q(torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0], dtype=torch.float64))
    s = (hi - lo) / 3
    torch.testing.assert_close(got, torch.tensor([0, s, 2 * s, 2 * s, 3 * s],
                                                 dtype=torch.float64))


@pytest.mark.parametrize('kind', ['gaussian', 'student2', 'student3',
                                  'outlier-channels'])
@pytest.mark.parametrize('bits', [4, 8])
def test_uniform_search_equals_repq_reference(kind, bits):
    """Every value of the full tensor scores every candidate (no
    subsample): the chosen clip is the reference's, so is the MSE."""
    x = heavy_tailed(kind)
    ref_err, ref_lo, ref_hi = ref_uniform_search(x, bits)
    q = calibrated(UniformQuantizer(bits, search='quantile'), x.double())
    assert q.scale.item() == pytest.approx(
        float((ref_hi - ref_lo) / (2**bits - 1)), rel=1e-9)
    err = (q(x.double()) - x.double()).square().mean()
    assert err <= ref_err * (1 + 1e-9)


def test_per_channel_search_is_the_per_tensor_search_of_each_channel():
    x = heavy_tailed('outlier-channels')  # [N, 64], channels last
    q = calibrated(UniformQuantizer(4, channel_axis=-1, search='quantile'),
                   x.double())
    for c in (0, 1, 2, 3, 40):
        _, lo, hi = ref_uniform_search(x[:, c], 4)
        assert q.scale[c].item() == pytest.approx(float((hi - lo) / 15),
                                                  rel=1e-9)
        assert q.zero_point[c].item() == torch.round(-lo / ((hi - lo) / 15))
    assert q.scale[:3].min() > 20 * q.scale[3:].max()


def test_weight_searches_paper_and_ours():
    torch.manual_seed(0)
    w = heavy_tailed('student3', 64 * 256).reshape(64, 256)
    paper = UniformQuantizer(4, 0, 'quantile')
    paper.finalize(w)
    for c in (0, 17):
        _, lo, hi = ref_uniform_search(w[c], 4)
        assert paper.scale[c].item() == pytest.approx(float((hi - lo) / 15),
                                                      rel=1e-6)
    ours = UniformQuantizer(4, 0, 'clip-ratio')
    ours.finalize(w)
    paper.set_state('quant')
    ours.set_state('quant')
    minmax = UniformQuantizer(4, 0, 'minmax')
    minmax.finalize(w)
    minmax.set_state('quant')
    err = {name: (q(w) - w).square().mean().item() for name, q in
           (('paper', paper), ('ours', ours), ('minmax', minmax))}
    # measured on this tensor: 0.0412, 0.0397, 0.0448 of E[w^2]
    assert err['ours'] < err['paper'] < err['minmax']


# ----------------------------------------------------------- log-sqrt2 --
def test_log_sqrt2_levels_by_hand():
    # 4 bits, scale 0.5: levels 0.5 * 2^(-q/2), q = 0..15, then 0
    q = LogSqrt2Quantizer(4)
    calibrated(q, torch.full((1000, ), 0.5))
    assert q.delta.item() == 0.5
    x = torch.tensor([0.5, 0.9, 0.3, 0.2, 0.1, 0.5 * 2**-7.5, 0.5 * 2**-8.2,
                      0.0])
    # -2 log2(x / 0.5): 0, -1.7 -> 0 (clipped at D), 1.47 -> 1, 2.64 -> 3,
    # 4.64 -> 5, 15, 16.4 -> 16 >= 16: dropped, inf: dropped
    expected = torch.tensor([0.5, 0.5, 0.5 * 2**-0.5, 0.5 * 2**-1.5,
                             0.5 * 2**-2.5, 0.5 * 2**-7.5, 0.0, 0.0])
    torch.testing.assert_close(q(x), expected)
    # odd levels are 2^-ceil(q/2) * sqrt 2, as the paper's shift form
    assert q(torch.tensor([0.5 * 2**-1.5])).item() == pytest.approx(
        0.5 * 2**-2 * math.sqrt(2))


def attention_rows(tokens, rows=64, temperature=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, tokens, generator=gen) * temperature
    return logits.softmax(-1)


@pytest.mark.parametrize('tokens', [49, 196, 4096])
def test_log_sqrt2_equals_repq_reference_on_attention(tokens):
    attn = attention_rows(tokens, temperature=2.0).double()
    ref_err, ref_delta = ref_log_sqrt2_search(attn, 4)
    q = calibrated(LogSqrt2Quantizer(4), attn)
    assert q.delta.item() == pytest.approx(float(ref_delta), rel=1e-9)
    torch.testing.assert_close(q(attn), ref_log_sqrt2(attn, 4, ref_delta))


@pytest.mark.parametrize('bits', [4, 8])
def test_log_sqrt2_of_masked_attention_equals_reference(bits):
    """Swin's shifted-window mask (-100 on the logits) leaves zeros and
    subnormal floats after the softmax; the quantizer raises tiny inputs
    to a bound before its log2 (speed): the result is still the formula,
    in float32, at a bound that is normal (4 bits) and subnormal (8)."""
    logits = torch.randn(256, 49, generator=torch.Generator().manual_seed(3))
    logits[:, ::3] -= 100.0
    attn = logits.softmax(-1)
    tiny = torch.finfo(torch.float32).tiny
    assert (attn == 0).any() and ((attn > 0) & (attn < tiny)).any()
    for delta in (0.9, 1e-3):
        q = LogSqrt2Quantizer(bits)
        q.delta = torch.tensor(delta)
        q.set_state('quant')
        torch.testing.assert_close(
            q(attn), ref_log_sqrt2(attn, bits, torch.tensor(delta)),
            rtol=1e-6, atol=0)


@pytest.mark.parametrize('quantizer', [LogSqrt2Quantizer, TanQuantizer])
def test_4096_key_rows_keep_their_mass_at_4_bits(quantizer):
    """ViTDet's global attention: weights near 1/4096. With the grid fixed
    at 1 (no calibrated scale) every weight fell below the last level and
    rows summed to about 0.008. (Logits of std 1 here; at std 2 the 16
    log-sqrt2 levels, which span D/181 to D, keep 0.61-0.70 of the mass,
    TanQ 0.74-0.85: a limit of 4 bits, not of the scale.)"""
    attn = attention_rows(4096, rows=32, temperature=1.0)
    q = calibrated(quantizer(4), attn)
    sums = q(attn).sum(-1)
    assert ((sums - 1).abs() < 0.1).all(), sums
    if quantizer is LogSqrt2Quantizer:  # what the scale-free grid gave
        unscaled = ref_log_sqrt2(attn, 4, torch.tensor(1.0)).sum(-1)
        assert (unscaled < 0.1).all()


# ---------------------------------------------------------------- TanQ --
def test_tanq_levels_by_hand():
    q = TanQuantizer(2)
    levels = q.levels_of(tau=1.0, delta=1.0)
    # l_k = 1/2 + arctan(2k/3 - 1) / (2 arctan 1), k = 0..3
    expected = [0.5 + math.atan(2 * k / 3 - 1) / (math.pi / 2)
                for k in range(4)]
    assert levels.tolist() == pytest.approx(expected)
    assert expected[0] == pytest.approx(0) and expected[3] == 1
    # dense near 0 and 1, sparse between (tau = 8)
    gaps = q.levels_of(8.0).diff()
    assert gaps[0] < gaps[1] and gaps[2] < gaps[1]


@pytest.mark.parametrize('bits', [3, 4, 6])
@pytest.mark.parametrize('tau', TanQuantizer.TAUS)
def test_tanq_quantizes_to_the_level_of_each_cell(bits, tau):
    torch.manual_seed(bits)
    q = TanQuantizer(bits)
    q._set_params(torch.tensor(0.8), tau)
    q.set_state('quant')
    x = torch.cat([torch.rand(20_000) ** 4, torch.rand(2000) * 1.2])
    out, expected = q(x).double(), ref_tanq(x, bits, 0.8, tau)
    # float32 vs float64: a value within 1e-6 of a cell boundary may fall
    # on either side
    big_k = 2**bits - 1
    boundaries = 0.8 * (0.5 + np.arctan(tau * (2 * (np.arange(big_k) + 0.5)
                                               / big_k - 1)) /
                        (2 * np.arctan(tau)))
    clear = torch.from_numpy(np.abs(x.double().numpy()[:, None] -
                                    boundaries[None]).min(1) > 1e-6)
    assert clear.float().mean() > 0.999
    torch.testing.assert_close(out[clear], expected[clear], rtol=1e-6,
                               atol=1e-7)


def test_tanq_range_and_tau_are_the_least_mse_pair():
    attn = attention_rows(196, temperature=3.0)
    q = calibrated(TanQuantizer(4), attn)
    flat = attn.reshape(1, -1)
    best = min(
        ((ref_tanq(attn.double(), 4, d, t) - attn.double()).square().mean()
         .item(), float(d), t)
        for d in quantiles(flat, PS)[:, 0] for t in TanQuantizer.TAUS)
    assert (q.delta.item(), q.tau.item()) == pytest.approx(best[1:])


# ----------------------------------------------- reparameterization --
class NormLinear(nn.Module):
    def __init__(self, channels=32):
        super().__init__()
        self.blk = nn.Module()
        self.blk.norm1 = nn.LayerNorm(channels)
        self.blk.attn = nn.Module()
        self.blk.attn.qkv = nn.Linear(channels, 3 * channels)

    def forward(self, x):
        return self.blk.attn.qkv(self.blk.norm1(x))


def outlier_channel_model():
    torch.manual_seed(0)
    net = NormLinear()
    with torch.no_grad():  # a few channels with a 30x wider range
        net.blk.norm1.weight.copy_(torch.rand(32) + 0.5)
        net.blk.norm1.weight[:3] *= 30
        net.blk.norm1.bias.copy_(torch.randn(32) * 0.1)
    return net, torch.randn(4, 256, 32)


def test_dopq_is_repq_with_tanq():
    """``dopq-vit`` reparameterizes as ``repq-vit`` (same target, same
    LayerNorm -> Linear output) and differs in the post-softmax quantizer."""
    net, x = outlier_channel_model()
    outs = {}
    for method in ('repq-vit', 'dopq-vit'):
        cfg = QuantConfig(4, 4, method)
        q = quantize_model(copy.deepcopy(net), cfg)
        summary = calibrate(q, cfg, lambda: q(x))
        assert summary['reparameterized'] == 1
        outs[method] = q(x)
    torch.testing.assert_close(outs['dopq-vit'], outs['repq-vit'])
    assert get_method('dopq-vit').softmax_quantizer(4).__class__ is \
        TanQuantizer


def test_reparameterized_model_is_float_exact_and_keeps_the_target():
    net, x = outlier_channel_model()
    cfg = QuantConfig(4, 4, 'repq-vit')
    q = quantize_model(copy.deepcopy(net), cfg)
    captured = {}
    quantizer = q.blk.attn.qkv.input_quantizer

    def run():
        captured['grid'] = q.blk.attn.qkv.input_quantizer  # per channel
        q(x)

    calibrate(q, cfg, run)
    grid = captured['grid']
    assert grid.channel_axis == -1 and grid.scale.numel() == 32
    # the target is the mean of the per-channel grids, kept as they are
    assert quantizer.scale.item() == pytest.approx(grid.scale.mean().item())
    assert quantizer.zero_point.item() == pytest.approx(
        grid.zero_point.mean().item())
    for module in q.modules():
        if hasattr(module, 'set_state'):
            module.set_state('fp')
    q.blk.attn.qkv.quant_weight = None
    torch.testing.assert_close(q(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('bits', [4, 6])
def test_reparameterized_layer_computes_repq_vits_quantized_function(bits):
    """The quantized output of a reparameterized LayerNorm -> Linear is
    RepQ-ViT's (written here from its code, float64): the activation
    ``y / r + t`` quantized per tensor with the target ``(s~, z~)``
    (fractional zero point, ``(clamp(round(v / s~) + z~, 0, 2^b - 1) - z~)
    s~``), the Linear with the quantized folded weight ``W_q = Q(W
    diag(r))`` and the float bias ``b - W diag(r) t``."""
    net, x = outlier_channel_model()
    cfg = QuantConfig(bits, bits, 'repq-vit')
    q = quantize_model(copy.deepcopy(net), cfg)
    captured = {}

    def run():
        captured['grid'] = q.blk.attn.qkv.input_quantizer  # per channel
        q(x)

    calibrate(q, cfg, run)
    s_c = captured['grid'].scale.double()
    z_c = captured['grid'].zero_point.double()
    s_t, z_t = s_c.mean(), z_c.mean()  # RepQ-ViT's target
    r, t = s_c / s_t, s_t * (z_c - z_t)
    with torch.no_grad():
        y = net.blk.norm1(x).double()
    levels = 2**bits - 1
    codes = torch.clamp(torch.round((y / r + t) / s_t) + z_t, 0, levels)
    y_hat = (codes - z_t) * s_t
    linear = net.blk.attn.qkv
    w_folded = linear.weight.double() * r[None, :]
    w_q = q.blk.attn.qkv.quant_weight.double()  # Q(W diag(r)), as searched
    reference = y_hat @ w_q.T + linear.bias.double() - w_folded @ t
    with torch.no_grad():
        out = q(x).double()
    # equal up to the few values float32 rounds across a level boundary
    assert (out - reference).norm() / reference.norm() < 1e-4
    # the shift through W_q instead (the earlier function) is farther off
    through_w_q = (y_hat - t) @ w_q.T + linear.bias.double()
    assert (through_w_q - reference).norm() / reference.norm() > 1e-3


@pytest.mark.parametrize('bits', [4, 8])
def test_integer_target_quantizes_each_channel_on_its_own_grid(bits):
    """RepQ-ViT's paper states that the reparameterized per-tensor
    quantizer reproduces the per-channel one. With the target zero point
    rounded (profile ``onnxruntime-integer``) it does: channel ``c`` of
    the LayerNorm output ``y`` comes out as ``(clamp(round(y / s_c) + z_c,
    0, 2^b - 1) - z_c) s_c`` (written here from the per-channel grid, float64),
    all but the few values float32 rounds across a level boundary; with
    the published fractional target (its code) a large share of values
    lands on another level, and the target zero point is not an
    integer."""
    net, x = outlier_channel_model()
    found = {}
    for profile in ('onnxruntime', 'onnxruntime-integer'):
        cfg = QuantConfig(bits, bits, 'repq-vit', profile=profile)
        q = quantize_model(copy.deepcopy(net), cfg)
        captured = {}

        def run():
            captured['grid'] = q.blk.attn.qkv.input_quantizer
            q(x)

        calibrate(q, cfg, run)
        s_c = captured['grid'].scale.double()
        z_c = captured['grid'].zero_point.double()
        with torch.no_grad():
            y = net.blk.norm1(x).double()
            y_rep = q.blk.norm1(x)  # y / r, the folded LayerNorm
            quantized = q.blk.attn.qkv.input_quantizer(y_rep).double()
        r = s_c / float(q.blk.attn.qkv.input_quantizer.scale)
        per_channel = (torch.clamp(torch.round(y / s_c) + z_c, 0,
                                   2**bits - 1) - z_c) * s_c
        off = ((quantized * r - per_channel).abs() > 1e-3 * s_c).double()
        found[profile] = (float(off.mean()), float(
            q.blk.attn.qkv.input_quantizer.zero_point))
    share, zero = found['onnxruntime-integer']
    assert share < 1e-3 and zero == round(zero)
    share, zero = found['onnxruntime']
    assert share > 0.1 and zero != round(zero)


# ------------------------------------------------------------ bad input --
@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_calibration_with_nan_names_the_layer(bad):
    net, x = outlier_channel_model()
    cfg = QuantConfig(4, 4, 'minmax')
    q = quantize_model(net, cfg)
    x[0, 0, 0] = bad
    with pytest.raises(ValueError, match=r'blk\.attn\.qkv\.input_quantizer '
                       'has NaN or inf'):
        calibrate(q, cfg, lambda: q(x))


def test_empty_calibration_input_names_the_layer():
    q = UniformQuantizer(4, search='quantile')
    q.layer_name = 'roi_head.mask_head.convs.0.conv.input_quantizer'
    with pytest.raises(ValueError, match=r'mask_head\.convs\.0\.conv\.input_'
                       r'quantizer is empty'):
        calibrated(q, torch.empty(0, 256, 14, 14))


@pytest.mark.parametrize('search', ['minmax', 'quantile'])
def test_constant_and_zero_activations_stay_exact(search):
    for value in (0.0, 2.5, -1.0):
        q = calibrated(UniformQuantizer(4, search=search),
                       torch.full((100, ), value))
        assert q.scale.item() > 0
        assert q(torch.tensor([value])).item() == pytest.approx(value)


def test_unreached_layer_is_named_and_left_in_float():
    class Branchy(NormLinear):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(32, 32)

    torch.manual_seed(0)
    net = Branchy()
    cfg = QuantConfig(8, 8, 'repq-vit')
    q = quantize_model(net, cfg)
    summary = calibrate(q, cfg, lambda: q(torch.randn(2, 8, 32)))
    assert summary['unreached'] == ['unused.input_quantizer']
    assert q.unused.input_quantizer.state == 'fp'
