"""APHQ-ViT's calibration: its grid searches, the calibration on the float
model's inputs and the new search after the reparameterization, against a
reference written here from its public code (GoatWu/APHQ-ViT,
``quant_layers/linear.py`` and ``conv.py``: ``calculate_percentile_*_
candidates``, ``_search_best_*_scale_self``, ``reparam_step1``)."""
import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from mmcd.core.quant import (DEPLOY_PROFILES, QuantConfig, QuantConv2d,
                             QuantMethod, UniformQuantizer, calibrate,
                             get_method, quantize_model)
from mmcd.core.quant.aphq_searches import product_search
from mmcd.core.quant.mlp_reconstruction import use_relu
from mmcd.core.quant.qdq import to_qdq

from test_aphq import toy


def aphq_grid_reference(row, bits, num_zp, min_scale=0.0, fix_zero=False,
                        weigh_by_size=False):
    """APHQ-ViT's search for one row, written from its code with loops:
    ``num_zp`` zero points around ``2^(b-1)`` (``fix_zero``: only 0) times
    ``128 // num_zp`` scales from the 0.999-quantile range to the full
    range, the first of least squared error. ``row`` may be a list of the
    rows of several calls of one layer: quantiles of all their values, and
    each call's mean error summed (its conv's ``_search_best_a_scale_self``;
    ``weigh_by_size``: the squared errors of all values summed instead)."""
    calls = row if isinstance(row, list) else [row]
    row = torch.cat(calls)
    levels = 2**bits - 1
    lo, hi = torch.quantile(row, 0.001), torch.quantile(row, 0.999)
    narrow, wide = float(hi - lo), float(row.max() - row.min())
    if fix_zero:
        zeros, num_scale = [0], 128
    else:
        zeros = range(2**(bits - 1) - num_zp // 2, 2**(bits - 1) + num_zp // 2)
        num_scale = 128 // num_zp
    best = None
    for z in zeros:
        for i in range(num_scale):
            u = i / (num_scale - 1) if num_scale > 1 else 0.0
            s = max((narrow + u * (wide - narrow)) / levels, min_scale)
            err = 0.0
            for x in calls:
                q = torch.clamp(torch.round(x / s) + z, 0, levels)
                e = ((q - z) * s - x).pow(2)
                err += float(e.sum() if weigh_by_size else e.mean())
            if best is None or err < best[0]:
                best = (err, s, z)
    return best[1], best[2]


def heavy_rows(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x[:, 0] *= 12  # an outlier per row: the clip range matters
    return x + torch.linspace(-0.5, 1.5, rows, dtype=torch.float64)[:, None]


@pytest.mark.parametrize('bits', [3, 4, 8])
@pytest.mark.parametrize('search, num_zp', [
    ('aphq-grid', lambda b: min(16, 2**b)),
    ('aphq-conv-grid', lambda b: 2**(b - 1))])
def test_weight_grid_per_output_channel_equals_the_reference(bits, search,
                                                             num_zp):
    w = heavy_rows(5, 300)
    quantizer = UniformQuantizer(bits, 0, search)
    quantizer.calibrate(w)
    for c in range(5):
        scale, zero = aphq_grid_reference(w[c], bits, num_zp(bits))
        assert float(quantizer.scale[c]) == pytest.approx(scale, rel=1e-9)
        assert float(quantizer.zero_point[c]) == zero


def test_activation_grid_clamps_the_scale_and_a_relu_input_keeps_zero_0():
    x = heavy_rows(1, 4000, seed=1)[0]
    q = UniformQuantizer(4, None, 'aphq-act-grid')
    q.calibrate(x)
    assert (float(q.scale), float(q.zero_point)) == pytest.approx(
        aphq_grid_reference(x, 4, 16, min_scale=1e-4), rel=1e-9)
    tiny = x * 1e-5  # every scale of the grid is under 1e-4
    q.calibrate(tiny)
    assert float(q.scale) == pytest.approx(1e-4)
    assert (float(q.scale), float(q.zero_point)) == pytest.approx(
        aphq_grid_reference(tiny, 4, 16, min_scale=1e-4), rel=1e-9)
    relu = x.clamp_min(0)
    q = UniformQuantizer(4, None, 'aphq-act-grid')
    q.input_follows_relu = True
    q.calibrate(relu)
    assert float(q.zero_point) == 0
    assert float(q.scale) == pytest.approx(
        aphq_grid_reference(relu, 4, 1, 1e-4, fix_zero=True)[0], rel=1e-9)
    conv = UniformQuantizer(4, None, 'aphq-conv-act-grid')
    conv.calibrate(x)
    assert (float(conv.scale), float(conv.zero_point)) == pytest.approx(
        aphq_grid_reference(x, 4, 8, min_scale=1e-4), rel=1e-9)


def test_a_conv_called_on_every_level_weighs_each_call_the_same():
    """A shared conv's input (an RPN head on every FPN level): candidates
    from all calls' values, each call's mean error summed, as APHQ-ViT's
    conv search; weighing the calls by size would choose another grid."""
    calls = [heavy_rows(1, 4000, seed=1)[0],
             8 * heavy_rows(1, 250, seed=2)[0] + 3]
    q = UniformQuantizer(4, None, 'aphq-conv-act-grid')
    q.calibrate_all(calls)
    chosen = (float(q.scale), float(q.zero_point))
    assert chosen == pytest.approx(
        aphq_grid_reference(calls, 4, 8, min_scale=1e-4), rel=1e-9)
    assert chosen != pytest.approx(aphq_grid_reference(
        calls, 4, 8, min_scale=1e-4, weigh_by_size=True), rel=1e-6)


def test_symmetric_grid_keeps_the_signed_zero_and_beats_min_max():
    w = heavy_rows(4, 300)
    grid = UniformQuantizer(4, 0, 'aphq-grid', symmetric=True)
    grid.calibrate(w)
    assert torch.all(grid.zero_point == 8)
    minmax = UniformQuantizer(4, 0, 'minmax', symmetric=True)
    minmax.calibrate(w)

    def error(q):
        return (q.quantize(w) - w).pow(2).sum(1)
    assert torch.all(error(grid) <= error(minmax))
    assert torch.any(error(grid) < error(minmax))


def test_aphq_vit_layers_get_their_searches_and_profiles_keep_its_grid():
    calibration_only = replace(get_method('aphq-vit'), reconstruction=None)
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(),
                                         nn.Linear(4, 2)),
                           QuantConfig(method=calibration_only))
    conv, linear = model[0], model[2]
    assert isinstance(conv, QuantConv2d)
    assert (conv.weight_quantizer.search, conv.input_quantizer.search) == (
        'aphq-conv-grid', 'aphq-conv-act-grid')
    assert (linear.weight_quantizer.search,
            linear.input_quantizer.search) == ('aphq-grid', 'aphq-act-grid')
    # a uniform post-softmax quantizer is not replaced by a profile's
    trt = DEPLOY_PROFILES.get('tensorrt')
    assert trt.apply(get_method('aphq-vit')).softmax == 'aphq-grid'
    assert trt.apply(get_method('repq-vit')).softmax == 'uniform'
    with pytest.raises(ValueError, match="calibration_inputs must be one "
                       "of \\('quantized', 'float'\\), got 'fp'"):
        QuantMethod('x', 'minmax', 'minmax', 'uniform',
                    calibration_inputs='fp')


def minmax_float_inputs():
    return QuantMethod('minmax-on-float', 'minmax', 'minmax', 'uniform',
                       calibration_inputs='float')


def test_float_calibration_sees_the_float_models_inputs():
    """The second layer's min-max grid comes from the float first layer's
    output; calibrated on the quantized prefix it does not; the weights and
    quantizers are switched on afterwards."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 3))
    x = torch.randn(40, 6) * 3
    hidden = net[0](x).detach()
    expected = (hidden.max() - hidden.min()) / 15
    for method, equal in ((minmax_float_inputs(), True), ('minmax', False)):
        model = quantize_model(copy.deepcopy(net),
                               QuantConfig(w_bits=4, a_bits=4, method=method))
        calibrate(model, QuantConfig(w_bits=4, a_bits=4, method=method),
                  lambda: model(x))
        scale = model[1].input_quantizer.scale
        assert bool(torch.isclose(scale, expected, rtol=1e-6)) == equal
        for q in (model[0].weight_quantizer, model[1].input_quantizer):
            assert q.state == 'quant' and not q.passes_float
        with torch.no_grad():
            assert not torch.allclose(model(x), net(x), atol=1e-3)


def test_failed_float_pass_leaves_the_model_in_float():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 3))
    cfg = QuantConfig(w_bits=4, a_bits=4, method=minmax_float_inputs())
    model = quantize_model(net, cfg)

    def fail():
        model(torch.randn(2, 6))
        raise RuntimeError('stopped')
    with pytest.raises(RuntimeError, match='stopped'):
        calibrate(model, cfg, fail)
    assert all(q.state == 'fp' and not q.passes_float
               for q in model.modules() if hasattr(q, 'passes_float'))


def test_aphq_vit_searches_the_reparameterized_input_again():
    """fc1's input: the per-channel grids of the float LayerNorm output
    ``y``, APHQ-ViT's target (mean scale, rounded mean zero point), the
    LayerNorm output moved to ``y / r - b`` (its reparam_step1), then the
    per-tensor grid searched on those values; fc2's input behind the ReLU
    of MLP reconstruction: zero point 0."""
    net, x = toy()
    cfg = QuantConfig(w_bits=4, a_bits=4, method='aphq-vit')
    captured = {}
    relu_net = copy.deepcopy(net)
    use_relu(relu_net)  # the float model the calibration pass computes
    relu_net.backbone.blocks[1].norm2.register_forward_hook(
        lambda m, a, out: captured.update(y=out.detach()))
    relu_net.backbone.blocks[1].mlp.fc2.register_forward_hook(
        lambda m, a, out: captured.update(h=a[0].detach()))
    with torch.no_grad():
        relu_net(x)
    y = captured['y'].reshape(-1, 8).double()
    scales, zeros = zip(*[aphq_grid_reference(y[:, c], 4, 16, 1e-4)
                          for c in range(8)])
    scale_c, zero_c = torch.tensor(scales), torch.tensor(zeros, dtype=y.dtype)
    target_s, target_z = scale_c.mean(), zero_c.mean().round()
    r = scale_c / target_s
    b = (-zero_c * scale_c) / r - (-target_z * target_s)
    moved = (y / r - b).reshape(-1)
    expected = aphq_grid_reference(moved, 4, 16, 1e-4)

    model = quantize_model(copy.deepcopy(net), cfg)  # ReLU in the MLPs
    calibrate(model, cfg, lambda: model(x))
    fc1 = model.backbone.blocks[1].mlp.fc1
    assert (float(fc1.input_quantizer.scale),
            float(fc1.input_quantizer.zero_point)) == pytest.approx(
                expected, rel=1e-5)
    fc2 = model.backbone.blocks[1].mlp.fc2.input_quantizer
    assert fc2.input_follows_relu and float(fc2.zero_point) == 0
    h = captured['h'].reshape(-1).double()
    assert float(fc2.scale) == pytest.approx(
        aphq_grid_reference(h, 4, 1, 1e-4, fix_zero=True)[0], rel=1e-5)


def aphq_product_reference(a, b, bits):
    """APHQ-ViT's matmul search (AsymmetricallyBatchingQuantMatMul.
    hyperparameter_searching, metric mse, 3 rounds), one head at a time
    with loops: returns per head ``(scale_a, zero_a, scale_b, zero_b)``."""
    levels, n = 2**bits - 1, 128
    pct = [0.999 + (0.99999 - 0.999) * (i / (n - 1))**0.1
           for i in range(n)] + [1.0]

    def grid(lo, hi):
        s = (hi - lo) / levels
        return s, -round(lo / s)

    def fq(x, lo, hi):
        s, z = grid(lo, hi)
        return (torch.clamp(torch.round(x / s) + z, 0, levels) - z) * s

    out = []
    for h in range(a.shape[1]):
        x = {'a': a[:, h], 'b': b[:, h]}
        target = x['a'] @ x['b']
        cands = {k: ([float(torch.quantile(v.flatten(), 1 - p)) for p in pct],
                     [float(torch.quantile(v.flatten(), p)) for p in pct])
                 for k, v in x.items()}
        cur = {k: [c[0][-2], c[1][-2]] for k, c in cands.items()}

        def search(k, los, his):
            other = 'b' if k == 'a' else 'a'
            q_other = fq(x[other], *cur[other])
            best = None
            for lo, hi in zip(los, his):
                q = fq(x[k], lo, hi)
                prod = q @ q_other if k == 'a' else q_other @ q
                err = float((prod - target).square().mean())
                if best is None or err < best[0]:
                    best = (err, lo, hi)
            cur[k] = [best[1], best[2]]

        for k in 'ab':
            search(k, *cands[k])
        for _ in range(3):
            for k in 'ab':
                search(k, cands[k][0], [cur[k][1]] * len(pct))
                search(k, [cur[k][0]] * len(pct), cands[k][1])
        out.append(grid(*cur['a']) + grid(*cur['b']))
    return out


def test_product_search_per_head_equals_the_reference():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, 4, 7, generator=g, dtype=torch.float64)
    a[:, 1] *= 4  # heads of other ranges
    b[0, 2, 0, 0] = 9.0  # an outlier in one head
    qa, qb = (UniformQuantizer(4, 1, 'aphq-act-grid') for _ in 'ab')
    product_search(qa, qb, a, b)
    for h, (sa, za, sb, zb) in enumerate(aphq_product_reference(a, b, 4)):
        assert float(qa.scale[h]) == pytest.approx(sa, rel=1e-9), h
        assert float(qb.scale[h]) == pytest.approx(sb, rel=1e-9), h
        assert (float(qa.zero_point[h]), float(qb.zero_point[h])) == (za, zb)
    assert qa.state == qb.state == 'quant'
    signed = [UniformQuantizer(8, 1, 'aphq-act-grid', symmetric=True)
              for _ in 'ab']
    product_search(*signed, a, b)  # a symmetric grid stays symmetric
    assert all(torch.all(q.zero_point == 128) for q in signed)


def test_attention_matmuls_per_head_calibrated_and_exported(tmp_path):
    """aphq-vit's attention matmuls: per-head grids (the MHA twin's [N*H,
    L, d] operands viewed per head), the quantized product equal to each
    head's fake quantization by hand, the export's float formula equal to
    the simulation; the integer profiles keep them per tensor."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8)
    method = replace(get_method('aphq-vit'), reconstruction=None)
    cfg = QuantConfig(w_bits=4, a_bits=4, method=method)
    model = quantize_model(nn.Sequential(mha), cfg)
    twin = model[0]
    calibrate(model, cfg, lambda: twin(x, x, x))
    qk = twin.qk_matmul
    assert qk.quantizer_a.scale.shape == (2, ) and qk.search == 'aphq-product'
    a = torch.randn(6, 5, 4)
    b = torch.randn(6, 4, 5)
    by_hand = []
    for i in range(6):
        h = i % 2
        fa = UniformQuantizer(4)
        fa.set_params(qk.quantizer_a.scale[h], qk.quantizer_a.zero_point[h])
        fb = UniformQuantizer(4)
        fb.set_params(qk.quantizer_b.scale[h], qk.quantizer_b.zero_point[h])
        by_hand.append(fa(a[i]) @ fb(b[i]))
    torch.testing.assert_close(qk(a, b), torch.stack(by_hand))
    with torch.no_grad():
        expected = twin(x, x, x)[0]
        report = to_qdq(model)
        assert 'qk_matmul.quantizer_a' in ' '.join(report['float_formula'])
        torch.testing.assert_close(twin(x, x, x)[0], expected, rtol=0,
                                   atol=0)
    onnxruntime = pytest.importorskip('onnxruntime')
    torch.onnx.export(qk, (a, b), str(tmp_path / 'qk.onnx'), dynamo=True,
                      opset_version=21)
    session = onnxruntime.InferenceSession(str(tmp_path / 'qk.onnx'))
    out = session.run(None, {'a': a.numpy(), 'b': b.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), qk(a, b), rtol=0,
                               atol=1e-5)
    for profile in ('tensorrt', 'onnxruntime-integer'):
        assert QuantConfig(8, 8, method, profile=profile
                           ).resolved_method.matmul_search is None
