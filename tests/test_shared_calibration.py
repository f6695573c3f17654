"""A module called more than once per calibration pass (mmdet's RPN head
runs on every FPN level): calibrated on its first call (RepQ-ViT's code) or
on all its calls (``QuantMethod.shared_calls='all'``: APHQ-ViT, QDrop)."""
import copy

import pytest
import torch
from torch import nn

from mmcd.core.quant import QuantConfig, QuantMethod, calibrate, \
    get_method, quantize_model

EVERY_CALL = QuantMethod('minmax-every-call', 'minmax', 'minmax', 'uniform',
                         shared_calls='all')


class SharedHead(nn.Module):
    """A conv and a classifier applied to every level, as an RPN head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.cls = nn.Conv2d(6, 2, 1)

    def forward(self, levels):
        return [self.cls(torch.relu(self.conv(x))) for x in levels]


def _levels():
    g = torch.Generator().manual_seed(0)
    # the second level is ten times wider and shifted: its range is not
    # the first one's
    return [torch.randn(2, 4, 8, 8, generator=g),
            10 * torch.randn(2, 4, 4, 4, generator=g) + 3]


def _minmax_grid(values, bits):
    """The min-max grid written out: ``s = (max(hi, 0) - min(lo, 0)) /
    (2^b - 1)``, ``z = round(-min(lo, 0) / s)``."""
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    scale = (hi - lo) / (2**bits - 1)
    return scale, round(-lo / scale)


def _grid_of(quantizer):
    return float(quantizer.scale), float(quantizer.zero_point)


def _inputs_of(module, model, levels):
    """The inputs ``module`` gets on every level in a run of ``model``."""
    seen = []
    handle = module.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().reshape(-1)))
    with torch.no_grad():
        model(levels)
    handle.remove()
    return torch.cat(seen)


def _calibrated(method, bits=8):
    torch.manual_seed(0)
    net = SharedHead()
    cfg = QuantConfig(w_bits=bits, a_bits=bits, method=method,
                      first_layer_bits=bits)
    model = quantize_model(copy.deepcopy(net), cfg)
    levels, passes = _levels(), []

    def run():
        passes.append(1)
        model(levels)
    summary = calibrate(model, cfg, run)
    return net, model, levels, summary, len(passes)


def test_a_shared_module_is_calibrated_on_every_level():
    """Calibrated on the quantized prefix (RepQ-ViT's way): the conv's grid
    spans both levels' inputs, and the classifier's spans what it gets on
    both levels from the calibrated conv (its chain settles in a second
    extra pass, a third confirms it); the first level alone gives another
    grid."""
    net, model, levels, summary, passes = _calibrated(EVERY_CALL)
    conv_in = torch.cat([x.reshape(-1) for x in levels])
    assert _grid_of(model.conv.input_quantizer) == pytest.approx(
        _minmax_grid(conv_in, 8), rel=1e-6)
    assert _grid_of(model.conv.input_quantizer) != pytest.approx(
        _minmax_grid(levels[0], 8), rel=1e-2)
    cls_in = _inputs_of(model.cls, model, levels)
    assert _grid_of(model.cls.input_quantizer) == pytest.approx(
        _minmax_grid(cls_in, 8), rel=1e-6)
    assert (summary['on_every_call'], summary['extra_passes']) == (2, 3)
    assert passes == 1 + 3 and summary['unsettled'] == []


def test_float_inputs_need_one_extra_pass():
    """Calibrated on the float model's inputs (APHQ-ViT's way): one extra
    pass gathers every call's float input; the classifier's grid spans the
    float conv's outputs on both levels."""
    method = QuantMethod('minmax-on-float', 'minmax', 'minmax', 'uniform',
                         calibration_inputs='float', shared_calls='all')
    net, model, levels, summary, passes = _calibrated(method, bits=4)
    cls_in = _inputs_of(net.cls, net, levels)
    assert _grid_of(model.cls.input_quantizer) == pytest.approx(
        _minmax_grid(cls_in, 4), rel=1e-6)
    assert (summary['extra_passes'], passes) == (1, 2)


def test_first_call_as_repq_vits_code():
    """``shared_calls='first'`` (RepQ-ViT, the default): the conv's grid is
    the first level's, and no extra pass runs."""
    assert [get_method(m).shared_calls for m in (
        'minmax', 'repq-vit', 'dopq-vit', 'qdrop', 'aphq-vit')] == [
            'first', 'first', 'first', 'all', 'all']
    net, model, levels, summary, passes = _calibrated('minmax')
    assert _grid_of(model.conv.input_quantizer) == pytest.approx(
        _minmax_grid(levels[0], 8), rel=1e-6)
    assert (summary['on_every_call'], passes) == (0, 1)
    with pytest.raises(ValueError, match="x: shared_calls must be one of "
                       r"\('first', 'all'\), got 'each'"):
        QuantMethod('x', 'minmax', 'minmax', 'uniform', shared_calls='each')


def test_no_shared_module_no_extra_pass():
    net = nn.Sequential(nn.Conv2d(4, 6, 1), nn.ReLU(), nn.Conv2d(6, 2, 1))
    cfg = QuantConfig(w_bits=8, a_bits=8, method=EVERY_CALL)
    model = quantize_model(net, cfg)
    passes = []
    summary = calibrate(model, cfg, lambda: passes.append(
        model(_levels()[0])))
    assert (len(passes), summary['on_every_call'],
            summary['extra_passes']) == (1, 0, 0)


def test_per_channel_grids_gather_each_channel_across_shapes():
    """A per-channel quantizer over inputs of different spatial sizes: each
    channel's grid spans that channel's values on every call."""
    from mmcd.core.quant import UniformQuantizer
    levels = _levels()
    q = UniformQuantizer(8, 1, 'minmax')
    q.calibrate_all(levels)
    for c in range(4):
        values = torch.cat([x[:, c].reshape(-1) for x in levels])
        scale, zero = _minmax_grid(values, 8)
        assert float(q.scale[c]) == pytest.approx(scale, rel=1e-6)
        assert float(q.zero_point[c]) == zero


class Chain(nn.Module):
    """Four shared convs in a chain, each run on both levels."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(4))

    def forward(self, levels):
        for conv in self.convs:
            levels = [torch.relu(conv(x)) for x in levels]
        return levels


def test_a_chain_longer_than_the_extra_passes_is_named():
    """Quantized inputs settle one link per extra pass: after the last of
    the four, the fourth conv's grid still moved and is named (the caller
    warns); the first three equal a min-max of their inputs in the
    calibrated model."""
    torch.manual_seed(0)
    cfg = QuantConfig(w_bits=8, a_bits=8, method=EVERY_CALL,
                      first_layer_bits=8)
    model = quantize_model(Chain(), cfg)
    levels = _levels()
    summary = calibrate(model, cfg, lambda: model(levels))
    assert summary['extra_passes'] == 4
    assert summary['unsettled'] == ['convs.3.input_quantizer']
    for conv in model.convs[:3]:
        assert _grid_of(conv.input_quantizer) == pytest.approx(
            _minmax_grid(_inputs_of(conv, model, levels), 8), rel=1e-6)


def test_a_shared_jointly_searched_matmul_keeps_its_first_call():
    """Per-head operands searched jointly on the product see one call: a
    matmul called twice keeps that search and is named."""
    from mmcd.core.quant import MatMul

    class TwiceAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.matmul = MatMul('qk', heads=2)

        def forward(self, levels):
            return [self.matmul(x, x.transpose(-2, -1)) for x in levels]

    method = QuantMethod('per-head-every-call', 'minmax', 'minmax',
                         'uniform', matmul_search='aphq-product',
                         shared_calls='all')
    cfg = QuantConfig(w_bits=8, a_bits=8, method=method)
    model = quantize_model(TwiceAttention(), cfg)
    g = torch.Generator().manual_seed(0)
    levels = [torch.randn(2, 2, 5, 3, generator=g),
              4 * torch.randn(2, 2, 7, 3, generator=g)]
    summary = calibrate(model, cfg, lambda: model(levels))
    assert sorted(summary['first_call_only']) == sorted(
        q.layer_name for q in (model.matmul.quantizer_a,
                               model.matmul.quantizer_b))
    assert summary['on_every_call'] == 0
