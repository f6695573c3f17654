"""QDQ rewrite (mmcd.core.quant.qdq) and ONNX export checked in
onnxruntime (mmcd.deploy): each op against hand-computed values and
bit-exact in onnxruntime, integer weights stored as 4-bit initializers, the
toy detector's backbone + neck exported float and W4A4, and the errors."""
import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from mmdet.structures import DetDataSample
from mmengine.registry import init_default_scope
from torch import nn

from mmcd.core.quant import (QuantConfig, QuantLinear, UniformQuantizer,
                             calibrate, quantize_model)
from mmcd.core.quant.qdq import (ActivationQDQ, QDQConv2d, QDQLinear,
                                 to_qdq)
from mmcd.core.quant.modules import MatMul
from mmcd.deploy import (ComparedFeatures, FeatureExtractor, OnnxFeatures,
                         OnnxPerShape, RoundingDraw, RuntimeDraw,
                         SummationDraw,
                         changed_detections, export_onnx, feature_consumer,
                         matched_detections)
from mmcd.deploy.yardstick import contraction_chunks
from mmcd.deploy.onnx_export import kernel_times, ort_session
from mmcd.utils.benchmark_models import build_detector


class Wrap(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return (self.module(x), )


def fixed_quantizer(bits, scale, zero):
    q = UniformQuantizer(bits)
    q.set_params(torch.tensor(scale), torch.tensor(zero))
    return q


def test_activation_qdq_by_hand():
    # 2 bits, s = 0.5, z = 2: q = clamp(round(x / 0.5) + 2, 0, 3)
    q = ActivationQDQ(fixed_quantizer(2, 0.5, 2.0))
    x = torch.tensor([-3.0, -1.0, -0.25, 0.0, 0.26, 0.75, 2.0])
    # x/s: -6 -2 -0.5 0 0.52 1.5 4 -> round (half to even): -6 -2 -0 0 1 2 4
    # +z, clamp: 0 0 2 2 3 3 3 -> (q - z) s
    expected = torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    torch.testing.assert_close(q(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize('bits,symmetric', [(2, False), (3, False),
                                            (4, False), (5, False),
                                            (8, False), (3, True),
                                            (4, True), (8, True)])
def test_activation_qdq_exact_in_onnxruntime(bits, symmetric, tmp_path):
    """Asymmetric grids as uint QDQ, symmetric ones (the tensorrt profile)
    as int QDQ with zero point 0."""
    torch.manual_seed(bits)
    x = torch.randn(1, 16, 24, 24) * 3
    quantizer = UniformQuantizer(bits, None, 'quantile', symmetric=symmetric)
    quantizer.set_state('calib')
    reference = quantizer(x)  # calibrates, then fake-quantizes
    path = export_onnx(Wrap(ActivationQDQ(quantizer)), x,
                       str(tmp_path / 'qdq.onnx'))
    out = OnnxFeatures(path)(x)[0]
    assert torch.equal(out, reference)  # bit for bit
    graph = onnx.load(path).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count('QuantizeLinear') == ops.count('DequantizeLinear') == 1
    assert ('Clip' in ops) == (bits not in (4, 8))
    zero, = [i for i in graph.initializer if i.name == graph.node[
        ops.index('QuantizeLinear')].input[2]]
    signed = {onnx.TensorProto.INT4, onnx.TensorProto.INT8}
    assert (zero.data_type in signed) == symmetric
    assert (int(onnx.numpy_helper.to_array(zero)) == 0) or not symmetric


@pytest.mark.parametrize('bits', [4, 8])
def test_fractional_zero_point_exported_as_its_formula(bits, tmp_path):
    """RepQ-ViT's target zero point (a mean, not rounded) has no
    QuantizeLinear form: the quantizer, with its per-channel shift, is
    exported as its float formula, bit for bit the simulation's; with the
    zero point cast to an integer the clipped values would move."""
    torch.manual_seed(bits)
    x = torch.randn(1, 16, 24, 24) * 3
    quantizer = UniformQuantizer(bits)
    quantizer.set_params(torch.tensor(6.0 / 2**bits),
                         torch.tensor(2.0**bits / 2 + 0.37),
                         channel_offset=torch.randn(24) * 0.3)
    reference = quantizer(x)
    model = nn.Sequential(nn.Identity())
    model[0] = quantizer
    report = to_qdq(model)
    assert report['fractional_zero'] == ['0'] and report['qdq'] == []
    assert torch.equal(model(x), reference)
    path = export_onnx(Wrap(model), x, str(tmp_path / 'f.onnx'))
    assert torch.equal(OnnxFeatures(path)(x)[0], reference)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert 'QuantizeLinear' not in ops and 'Round' in ops
    # values clipped at the lower end (where an integer zero point would
    # move them by 0.37 steps) are among those compared
    clipped = (reference - (-quantizer.zero_point * quantizer.scale -
                            quantizer.channel_offset)).abs() < 1e-6
    assert clipped.any()


def calibrated_conv_linear(bits, seed=0, profile='onnxruntime'):
    """Conv -> ReLU -> Flatten -> Linear with ``bits``-bit weights and
    8-bit inputs, min-max calibrated on its input ``x`` ``[4, 3, 6, 6]``
    for ``profile``; returns ``(model, x)``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    x = torch.randn(4, 3, 6, 6)
    cfg = QuantConfig(bits, 8, 'minmax', first_layer_bits=8, profile=profile)
    quantize_model(model, cfg)
    calibrate(model, cfg, lambda: model(x))
    return model, x


@pytest.mark.parametrize('bits', [4, 8])
def test_integer_weights(bits, tmp_path):
    model, x = calibrated_conv_linear(bits)
    fake = model(x)
    with torch.no_grad():
        fake_weight = model[3].weight_quantizer(model[3].weight)
    report = to_qdq(model)
    assert report['integer_weights'] == ['0', '3']
    assert isinstance(model[0], QDQConv2d) and isinstance(model[3], QDQLinear)
    assert torch.equal(model(x), fake)  # the rewrite is the simulation
    ints = model[3].weight_int
    # signed storage: the codes and zero points shifted by 2^(b-1)
    assert ints.dtype == torch.int8
    assert -2**(bits - 1) <= int(ints.min()) and \
        int(ints.max()) <= 2**(bits - 1) - 1
    assert torch.equal(
        (ints.t().float() - model[3].weight_zero_point[:, None])
        * model[3].weight_scale[:, None], fake_weight)
    path = export_onnx(Wrap(model), x[:1], str(tmp_path / 'w.onnx'))
    graph = onnx.load(path).graph
    weights = [i for i in graph.initializer
               if list(i.dims) == list(ints.shape)]
    kind = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
    assert len(weights) == 1 and weights[0].data_type == kind
    stored = onnx.numpy_helper.to_array(weights[0]).astype(np.int64)
    assert np.array_equal(stored, ints.numpy().astype(np.int64))
    # each layer alone (the Linear after the conv would see rounding flips
    # of its input quantizer from float-order differences of the conv)
    for layer, inputs in ((model[0], x[:1]),
                          (model[3], model[:3](x[:1]))):
        path = export_onnx(Wrap(layer), inputs, str(tmp_path / 'l.onnx'))
        torch.testing.assert_close(OnnxFeatures(path)(inputs)[0],
                                   layer(inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('conv', [
    dict(kernel_size=3, padding=1), dict(kernel_size=4, stride=4),
    dict(kernel_size=1), dict(kernel_size=3, stride=2, padding=2, dilation=2),
    dict(kernel_size=(1, 3), padding=(0, 1), bias=False)])
def test_conv_exported_as_integer_matmul(conv, tmp_path):
    """Profile onnxruntime, 8-bit weights: the Conv is exported as im2col on
    the input's codes + MatMul, which onnxruntime fuses into its integer
    kernel (no Conv, no DequantizeLinear left), computing the QDQ model's
    convolution to float rounding in both exporters (the padding is the
    zero point's code: the calibrated zero point is not 0 here, a 0 code
    would move every border output); the int8 matrix holds the weight's
    integers row ``(i kw + j) C_in + c`` for kernel offset ``(i, j)``,
    input channel ``c``."""
    from test_deploy_end2end import run_onnx, torchscript_onnx
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 5, **conv))
    x = torch.randn(2, 6, 13, 16) + 1.0
    cfg = QuantConfig(8, 8, 'minmax', first_layer_bits=8)
    quantize_model(model, cfg)
    calibrate(model, cfg, lambda: model(x))
    with torch.no_grad():
        fake = model(x)
        fake_weight = model[0].weight_quantizer(model[0].weight)
    assert 0 < float(model[0].input_quantizer.zero_point) < 255
    to_qdq(model)
    layer = model[0]
    assert layer.integer_matmul and torch.equal(model(x), fake)
    kh, kw = layer.kernel_size
    matrix = (layer.weight_int.float() - layer.weight_zero_point) * \
        layer.weight_scale
    for i in range(kh):
        for j in range(kw):
            rows = slice((i * kw + j) * 6, (i * kw + j + 1) * 6)
            assert torch.equal(matrix[rows], fake_weight[:, :, i, j].t())
    path = export_onnx(Wrap(model), x[:1], str(tmp_path / 'c.onnx'))
    torch.testing.assert_close(OnnxFeatures(path)(x[:1])[0], fake[:1],
                               rtol=1e-5, atol=1e-5)
    ort_session(path, optimized_path=str(tmp_path / 'opt.onnx'))
    ops = [n.op_type for n in onnx.load(str(tmp_path / 'opt.onnx')).graph.node]
    assert ops.count('MatMulIntegerToFloat') == 1
    assert 'Conv' not in ops and 'DequantizeLinear' not in ops
    traced = torchscript_onnx(model, x[:1], str(tmp_path / 'ts.onnx'))
    torch.testing.assert_close(run_onnx(traced, x[:1]), fake[:1], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize('bits,profile', [(8, 'tensorrt'),
                                          (4, 'onnxruntime')])
def test_conv_form_where_no_integer_matmul_applies(bits, profile, tmp_path):
    """TensorRT fuses Q/DQ -> Conv itself; 4-bit weights are int4, which
    onnxruntime's integer matmul does not take: both keep the Conv."""
    model, x = calibrated_conv_linear(bits, profile=profile)
    to_qdq(model, profile)
    assert not model[0].integer_matmul
    path = export_onnx(Wrap(model[0]), x[:1], str(tmp_path / 'c.onnx'))
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert 'Conv' in ops and 'MatMul' not in ops


@pytest.mark.parametrize('bits', [4, 8])
def test_reparameterized_linear_exact_in_onnxruntime(bits, tmp_path):
    """A Linear whose input quantizer carries RepQ-ViT's shift and its
    fractional target zero point (a float formula before the MatMul):
    onnxruntime fuses its weight into MatMulNBits, which at its default
    accuracy level quantized the float input to int8 on the fly (max error
    1.1e-2 here); the sessions mmcd opens compute it in float32: the
    simulation's output exactly."""
    torch.manual_seed(bits)
    model = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(1, 50, 64)
    cfg = QuantConfig(bits, 8, 'minmax')
    quantize_model(model, cfg)
    calibrate(model, cfg, lambda: model(x))
    model[0].input_quantizer.channel_offset = torch.randn(64) * 0.5
    model[0].input_quantizer.zero_point.add_(0.3)
    fake = model(x)
    to_qdq(model)
    path = export_onnx(Wrap(model), x, str(tmp_path / 'r.onnx'))
    optimized = str(tmp_path / 'r_optimized.onnx')
    ort_session(path, optimized_path=optimized)
    assert 'MatMulNBits' in [n.op_type
                             for n in onnx.load(optimized).graph.node]
    torch.testing.assert_close(OnnxFeatures(path)(x)[0], fake, rtol=1e-6,
                               atol=1e-6)


def test_reparameterized_linear_with_an_integer_zero_point_fuses(tmp_path):
    """With an integer zero point (profile ``onnxruntime-integer``) the shift
    ``t`` of a reparameterized input folds into the Linear's bias: ``W_q
    (Q(x + t) - t) + b + (W_q - W) t = W_q Q(x + t) + b - W t``, the
    simulation's output to float rounding in PyTorch and onnxruntime, and
    onnxruntime fuses Add -> QDQ -> MatMul into its integer kernel (no
    Sub, no MatMulNBits)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(1, 50, 64)
    cfg = QuantConfig(8, 8, 'minmax')
    quantize_model(model, cfg)
    calibrate(model, cfg, lambda: model(x))
    offset = torch.randn(64) * 0.5
    model[0].input_quantizer.channel_offset = offset
    quantizer = model[0].input_quantizer
    s, z = float(quantizer.scale), float(quantizer.zero_point)
    with torch.no_grad():
        fake = model(x)
        shifted = (torch.clamp(torch.round((x + offset) / s) + z, 0, 255)
                   - z) * s
        by_hand = F.linear(shifted, model[0].effective_weight(),
                           model[0].bias - model[0].weight @ offset)
    torch.testing.assert_close(fake, by_hand, rtol=1e-5, atol=1e-5)
    to_qdq(model, 'onnxruntime-integer')
    with torch.no_grad():
        torch.testing.assert_close(model(x), fake, rtol=1e-5, atol=1e-5)
    path = export_onnx(Wrap(model), x, str(tmp_path / 'r.onnx'))
    optimized = str(tmp_path / 'r_optimized.onnx')
    ort_session(path, optimized_path=optimized)
    ops = [n.op_type for n in onnx.load(optimized).graph.node]
    assert 'MatMulIntegerToFloat' in ops
    assert 'MatMulNBits' not in ops and 'Sub' not in ops
    torch.testing.assert_close(OnnxFeatures(path)(x)[0], fake, rtol=1e-5,
                               atol=1e-5)


def test_errors(tmp_path):
    model = quantize_model(nn.Sequential(nn.Linear(4, 4)),
                           QuantConfig(4, 4, 'minmax'))
    with pytest.raises(ValueError, match='no calibrated quantizer'):
        to_qdq(model)
    cfg = QuantConfig(4, 4, 'minmax')
    calibrate(model, cfg, lambda: model(torch.randn(8, 4)))
    to_qdq(model)
    with pytest.raises(ValueError, match='opset >= 21'):
        export_onnx(Wrap(model), torch.randn(1, 4),
                    str(tmp_path / 'm.onnx'), opset=18)
    onnx_model = OnnxPerShape(Wrap(model), str(tmp_path), 'm')
    onnx_model(torch.randn(1, 4))
    with pytest.raises(ValueError, match='exported for input shape'):
        onnx_model.sessions[(1, 4)](torch.randn(2, 4))


def test_toy_detector_backbone_neck_w4a4(tmp_path):
    """The toy detector (random weights) exports float and W4A4 RepQ-ViT;
    onnxruntime matches PyTorch: float to 1e-4, quantized within one step of
    the RPN's input quantizer everywhere and 0.05 steps on average (each op
    alone is exact, tested above; float-order differences may still flip a
    value on a rounding boundary; measured here: bit for bit equal, against
    0.19-0.26 steps on average while the exporter truncated RepQ-ViT's
    fractional zero points and onnxruntime quantized the inputs of the
    reparameterized Linears to int8 on the fly)."""
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = build_detector(
        'configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py')
    images = torch.randn(2, 3, 128, 128)
    meta = dict(img_shape=(128, 128), ori_shape=(128, 128),
                pad_shape=(128, 128), scale_factor=(1.0, 1.0),
                batch_input_shape=(128, 128))
    cfg = QuantConfig(4, 4, 'repq-vit')
    quant = quantize_model(copy.deepcopy(model), cfg)
    calibrate(quant, cfg, lambda: quant.predict(
        images, [DetDataSample(metainfo=meta) for _ in range(2)]))
    qdq = copy.deepcopy(quant)
    report = to_qdq(qdq)
    assert report['float'] == []
    assert len(report['float_formula']) == 5  # log-sqrt2, one per block
    # reparameterized inputs (qkv, fc1 of 5 blocks, 3 patch mergings)
    assert len(report['fractional_zero']) == 13
    x = images[:1]
    with torch.no_grad():
        fake = FeatureExtractor(quant)(x)
        assert all(torch.equal(a, b) for a, b in
                   zip(FeatureExtractor(qdq)(x), fake))
        reference = FeatureExtractor(model)(x)
    floats = OnnxPerShape(FeatureExtractor(model), str(tmp_path), 'f')(x)
    for a, b in zip(floats, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    onnx_q = OnnxPerShape(FeatureExtractor(qdq), str(tmp_path), 'q')
    step = float(quant.rpn_head.rpn_conv.input_quantizer.scale)
    compared = ComparedFeatures(onnx_q, FeatureExtractor(quant), step)
    deployed = compared(x)
    for a, b in zip(deployed, fake):
        assert float((a - b).abs().max()) <= step
        assert float((a - b).abs().mean()) < 0.05 * step
    compared(images[1:])  # the comparison keeps the largest over calls
    checked = compared.summary()
    assert checked['calls'] == 2 and checked['beyond_one_step'] == 0
    assert checked['values'] == 2 * sum(f.numel() for f in fake)
    assert max(checked['max_steps']) <= 1
    graph = onnx.load(onnx_q.path_for(x)).graph
    ops = [n.op_type for n in graph.node]
    exported = ('backbone.', 'neck.')  # the heads stay in PyTorch
    assert ops.count('QuantizeLinear') == len(
        [n for n in report['qdq'] if n.startswith(exported)])
    weights = [n for n in report['integer_weights']
               if n.startswith(exported)]
    assert ops.count('DequantizeLinear') == ops.count(
        'QuantizeLinear') + len(weights)
    # 4-bit weights as int4 (the patch embedding's input stays 8-bit)
    assert sum(i.data_type == onnx.TensorProto.INT4 and len(i.dims) > 1
               for i in graph.initializer) == len(weights)


def test_rounding_draw_moves_quantizer_inputs_one_float32_step():
    """The sim-vs-deploy yardstick: every activation quantizer's input moves
    to a neighbouring float32 (the same per seed), so values on a rounding
    boundary flip by one step and all others stay; weights stay."""
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = fixed_quantizer(8, 0.25, 128.0)
            self.linear = QuantLinear.from_float(
                nn.Linear(80, 80, bias=False), 8, 8, 'minmax')
            self.linear.weight_quantizer = fixed_quantizer(8, 0.25, 128.0)

        def extract_feat(self, x):
            weight = self.linear.weight_quantizer(self.linear.weight)
            return self.act(x), weight

    detector = Detector()
    with torch.no_grad():  # every weight on a rounding tie of its quantizer
        detector.linear.weight.copy_(
            (torch.arange(80.) - 40 + 0.5).repeat(80, 1) * 0.25)
    ties = (torch.arange(80.) - 40 + 0.5) * 0.25  # half a step off the grid
    simulated, weight = detector.extract_feat(ties)
    drawn, drawn_weight = RoundingDraw(detector, seed=3)(ties)
    assert torch.equal(drawn_weight, weight)
    assert torch.equal(drawn, RoundingDraw(detector, seed=3)(ties)[0])
    assert not torch.equal(drawn, RoundingDraw(detector, seed=4)(ties)[0])
    flipped = drawn != simulated
    assert 10 < int(flipped.sum()) < 50  # moved the other way: ~1/3 of 80
    assert torch.equal((drawn - simulated)[flipped].abs(),
                       torch.full((int(flipped.sum()), ), 0.25))
    on_grid = ties + 0.125 + 0.05  # no value near a boundary: nothing moves
    assert torch.equal(RoundingDraw(detector, seed=3)(on_grid)[0],
                       detector.extract_feat(on_grid)[0])
    assert not detector.act._forward_pre_hooks  # the hooks are removed


def test_contraction_chunks_cover_the_range_once():
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for size in (1, 2, 3, 7, 96):
        for _ in range(20):
            pieces = contraction_chunks(size, gen)
            assert 1 <= len(pieces) <= min(4, size)
            covered = sorted(i for p in pieces for i in range(size)[p])
            assert covered == list(range(size))
            seen.add(tuple(p.start for p in pieces))
    assert len(seen) > 20  # random cuts and orders


class Reductions(nn.Module):
    """A Linear, a convolution, a grouped convolution and a matmul, long
    contractions (256) so float32 summation orders differ."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(256, 32)
        self.conv = nn.Conv2d(64, 8, 3, padding=1)
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.matmul = MatMul('qk')

    def extract_feat(self, x):
        tokens = x.flatten(2).transpose(1, 2)  # [1, 256 tokens, 64]
        return (self.linear(x.flatten(1).view(4, 256)), self.conv(x),
                self.grouped(x), self.matmul(tokens.transpose(1, 2), tokens))


def test_summation_draw_reorders_every_contraction_and_nothing_else():
    """Exact arithmetic: the draw computes the simulation's function
    (float64: equal to 1e-12); float32: it differs from the simulation by
    accumulation rounding only, as close to the float64 truth as the
    simulation is; per seed reproducible; a grouped convolution, whose
    per-group contraction it does not split, is left bit for bit."""
    torch.manual_seed(0)
    model = Reductions()
    cfg = QuantConfig(8, 8, 'minmax')
    model = quantize_model(model, cfg)
    x = torch.randn(1, 64, 4, 4) * 3
    calibrate(model, cfg, lambda: model.extract_feat(x))
    with torch.no_grad():
        simulated = model.extract_feat(x)
        drawn = SummationDraw(model, seed=1)(x)
        assert torch.equal(drawn[2], simulated[2])  # grouped: left alone
        for i in (0, 1, 3):
            assert not torch.equal(drawn[i], simulated[i]), i
            again, other = (SummationDraw(model, seed)(x)[i]
                            for seed in (1, 2))
            assert torch.equal(drawn[i], again)
            assert not torch.equal(drawn[i], other)
        exact = copy.deepcopy(model).double()
        for m in exact.modules():  # the cached fake-quantized weights too
            if hasattr(m, 'quant_weight'):
                m.cache_weight()
        truth = exact.extract_feat(x.double())
        drawn64 = SummationDraw(exact, seed=1)(x.double())
        for i in (0, 1, 3):
            torch.testing.assert_close(drawn64[i], truth[i], rtol=0,
                                       atol=1e-12)
            sim_error = (simulated[i].double() - truth[i]).abs().mean()
            draw_error = (drawn[i].double() - truth[i]).abs().mean()
            assert 0.25 < float(draw_error / sim_error) < 4, i
            assert float((drawn[i] - simulated[i]).abs().max()) < \
                1e-4 * float(truth[i].abs().max())
    assert not any(m._forward_hooks for m in model.modules())


def test_runtime_draw_reorders_sums_and_moves_quantizer_inputs():
    """The default yardstick does both: the quantizer inputs on a rounding
    tie flip as under RoundingDraw, and the contractions are summed in
    another order as under SummationDraw; its hooks are gone after."""
    torch.manual_seed(0)
    model = quantize_model(Reductions(), QuantConfig(8, 8, 'minmax'))
    x = torch.randn(1, 64, 4, 4) * 3
    calibrate(model, QuantConfig(8, 8, 'minmax'),
              lambda: model.extract_feat(x))
    with torch.no_grad():
        simulated = model.extract_feat(x)[0]
        summed = SummationDraw(model, seed=1)(x)[0]
        both = RuntimeDraw(model, seed=1)(x)[0]
        assert not torch.equal(both, simulated)
        assert not torch.equal(both, summed)  # the inputs moved as well
        assert float((both - simulated).abs().max()) < 1e-4 * float(
            simulated.abs().max())
        # inputs half a step off the grid of an input quantizer (exact
        # ties: a power-of-two step): about a third flip
        quantizer = model.linear.input_quantizer = fixed_quantizer(
            8, 0.25, 128.0)
        ties = (torch.arange(1024.) % 80 - 40 + 0.5) * 0.25
        q_sim = quantizer(ties)
        handles = RuntimeDraw(model, seed=3).install(
            torch.Generator().manual_seed(3))
        try:
            flipped = quantizer(ties) != q_sim
        finally:
            for handle in handles:
                handle.remove()
        assert 200 < int(flipped.sum()) < 500  # ~1/3 of 1024
    assert not any(m._forward_hooks or m._forward_pre_hooks
                   for m in model.modules())


def test_feature_consumer_is_the_heads_first_quantizer():
    """The unit of the feature comparison: the first activation quantizer
    applied after extract_feat, whatever the head (not a named RPN)."""
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(4, 4)
            self.head_in, self.head_out = nn.Linear(4, 4), nn.Linear(4, 2)

        def extract_feat(self, x):
            return self.backbone(x)

        def test_step(self, batch):
            return self.head_out(self.head_in(self.extract_feat(
                batch['inputs'])))

    detector = quantize_model(Detector(), QuantConfig(8, 8, 'minmax'))
    batch = dict(inputs=torch.randn(3, 4))
    calibrate(detector, QuantConfig(8, 8, 'minmax'),
              lambda: detector.test_step(batch))
    assert feature_consumer(detector, batch) is \
        detector.head_in.input_quantizer
    assert 'extract_feat' not in vars(detector)  # the method is back
    assert not any(q._forward_pre_hooks for q in detector.modules())


def test_changed_detections_by_hand():
    """Same label and IoU >= 0.9, one to one: boxes [0,0,10,10] and
    [0,0,10,11] overlap 100/110 = 0.909; [0,0,10,12]: 100/120 = 0.833."""
    t = torch.tensor
    reference = (t([[0., 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]]),
                 t([0.9, 0.8, 0.7]), t([1, 2, 1]))
    other = (t([[0., 0, 10, 11], [20, 20, 30, 30], [50, 50, 60, 62],
                [0, 0, 10, 10]]), t([0.9, 0.8, 0.7, 0.1]), t([1, 3, 1, 1]))
    # box 1 -> other 4 (IoU 1.0 beats other 1's 0.909); box 2: another
    # label; box 3: IoU 0.833
    assert matched_detections(reference, other) == 1
    assert matched_detections(reference, other, iou=0.8) == 3 - 1
    empty = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=int))
    result = changed_detections([reference, empty], [other, empty])
    assert result == dict(changed=3 + 4 - 2, total=7, images=[0])
    with pytest.raises(ValueError, match='2 images against 1'):
        changed_detections([reference, empty], [other])


@pytest.mark.slow  # the end-to-end --eval run (pytest -m slow)
def test_export_tool_evaluates_every_image_of_draws_and_onnxruntime(
        micro_run, tmp_path):
    """``export_onnx.py --eval``: the draws (runtime, the default)
    and the onnxruntime backbone + neck are what the evaluations run (their
    features are compared with the simulation's on every val image: 4 calls
    each; a draw assigned as a submodule was silently bypassed before)."""
    from test_tools_cli import run_tool
    config, ckpt = micro_run
    code, out = run_tool('tools/deploy/export_onnx.py', config, ckpt,
                         '--quant', 'w8a8', '--calib-images', '2', '--eval',
                         '--draws', '2', '--out-dir', str(tmp_path),
                         timeout=600)
    assert code == 0, out
    with open(tmp_path / 'export.json') as f:
        result = json.load(f)
    checked = result['map']['all_images_feature_deviation']
    assert set(checked) == {'runtime draw 1', 'runtime draw 2',
                            'onnxruntime'}
    for found in checked.values():
        assert found['calls'] == 4 and len(found['max_steps']) == 5
        assert 0 <= found['beyond_one_step'] <= found['values']
        detections = found['detections']
        assert 0 <= detections['changed'] <= detections['total']
    assert len(result['map']['draws']) == 2
    assert set(result['map']['standard_scores']) == {'coco/bbox_mAP',
                                                     'coco/segm_mAP'}
    assert "std from the draws' mean" in out
    assert result['map']['draw_kind'] == 'runtime'
    assert 'all 4 test images, onnxruntime vs PyTorch: features' in out


@pytest.mark.slow  # a toy DINO trained, exported and evaluated
def test_export_tool_on_a_query_based_detector(micro_data_root, tmp_path):
    """DINO (no RPN, boxes only): the features are compared in steps of its
    first encoder projection's input quantizer, and the mAP lines cover
    the box metric it has."""
    from test_tools_cli import run_tool
    from test_train_tool import data_options
    config = 'configs/toy/dino-5scale_swin-toy_12e_toy-coco_cd.py'
    options = data_options(micro_data_root)
    code, out = run_tool('tools/train.py', config, '--work-dir',
                         str(tmp_path / 'run'), '--cfg-options', *options,
                         'train_cfg.max_epochs=1', timeout=900)
    assert code == 0, out
    code, out = run_tool('tools/deploy/export_onnx.py', config,
                         str(tmp_path / 'run' / 'epoch_1.pth'), '--quant',
                         'w4a4', '--calib-images', '2', '--eval', '--draws',
                         '2', '--out-dir', str(tmp_path / 'onnx'),
                         '--cfg-options', *options, timeout=900)
    assert code == 0, out
    result = json.loads((tmp_path / 'onnx' / 'export.json').read_text())
    assert result['feature_consumer'] == \
        'encoder.layers.0.self_attn.value_proj.input_quantizer'
    assert set(result['map']['standard_scores']) == {'coco/bbox_mAP'}


def test_export_tool_errors(tmp_path):
    from test_tools_cli import (TOY_CONFIG, assert_one_line_error,
                                run_here)
    ckpt = tmp_path / 'model.pth'
    torch.save({}, ckpt)
    tool = 'tools/deploy/export_onnx.py'
    code, out = run_here(tool, TOY_CONFIG, str(tmp_path / 'nope.pth'),
                         '--quant', 'w4a4')
    assert_one_line_error(code, out, 'does not exist')
    code, out = run_here(tool, TOY_CONFIG, str(ckpt), '--quant', 'w4a4',
                         '--opset', '18')
    assert_one_line_error(code, out, 'opset >= 21')
    code, out = run_here(tool, TOY_CONFIG, str(ckpt), '--quant', 'w4a4',
                         '--scope', 'detector', '--opset', '21')
    assert_one_line_error(code, out, 'takes opsets 13..20')
    code, out = run_here(tool, 'configs/toy/dino-5scale_swin-toy_12e_toy-'
                         'coco_cd.py', str(ckpt), '--quant', 'w4a4',
                         '--scope', 'detector')
    assert_one_line_error(code, out, 'export its backbone + neck with '
                          '--scope features')
    code, out = run_here(tool, TOY_CONFIG, str(ckpt), '--quant', 'w4a4',
                         '--draws', '0')
    assert_one_line_error(code, out, '--draws must be >= 1')
    code, out = run_here(tool, TOY_CONFIG, str(ckpt), '--quant', 'w4a4',
                         '--layer-bits', 'x=w1')
    assert_one_line_error(code, out, 'bits must be an integer in 2..8')
    code, out = run_here(tool, TOY_CONFIG, str(ckpt), '--quant', 'w4a4',
                         '--profile', 'tensorrt')
    assert_one_line_error(code, out, "profile 'tensorrt' (TensorRT INT8) "
                          'runs 8-bit integers only, not the 4-bit of '
                          'a_bits=4, w_bits=4: choose w8a8')


def test_kernel_times_of_a_profiler_trace(tmp_path):
    """Seconds per operator type: the ``*_kernel_time`` Node events summed
    (fences and session events left out), by hand on a written trace, then
    on a real trace of a small model (its operator types, positive)."""
    trace = [
        dict(cat='Session', name='model_run', dur=900),
        dict(cat='Node', name='/a/Conv_fence_before', dur=7,
             args=dict(op_name='Conv')),
        dict(cat='Node', name='/a/Conv_kernel_time', dur=300,
             args=dict(op_name='Conv')),
        dict(cat='Node', name='/b/Conv_kernel_time', dur=200,
             args=dict(op_name='Conv')),
        dict(cat='Node', name='/m/MatMul_kernel_time', dur=50,
             args=dict(op_name='MatMul'))]
    path = tmp_path / 'trace.json'
    path.write_text(json.dumps(trace))
    times = kernel_times(str(path))
    assert times.keys() == {'Conv', 'MatMul'}
    assert times['Conv'] == pytest.approx(500e-6)
    assert times['MatMul'] == pytest.approx(50e-6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x = torch.randn(1, 3, 8, 8)
    onnx_path = export_onnx(Wrap(model), x, str(tmp_path / 'm.onnx'))
    session = ort_session(onnx_path, profile_prefix=str(tmp_path / 'p'))
    session.run(None, {session.get_inputs()[0].name: x.numpy()})
    measured = kernel_times(session.end_profiling())
    assert measured and all(t > 0 for t in measured.values())
    # onnxruntime's NCHWc layout of the Conv (ReLU fused into it)
    assert 'Conv' in measured and set(measured) <= {'Conv', 'ReorderInput',
                                                    'ReorderOutput'}


def test_interleaved_latency_medians_of_runs_in_turn(monkeypatch):
    """Each session runs once per round, in turn; warm-up rounds are not
    timed; the result is each session's median (by hand on a fake clock
    that each run advances by its session's next duration)."""
    import time
    from mmcd.deploy import interleaved_latency
    clock, order = [0.0], []

    class Session:
        def __init__(self, key, durations):
            self.key, self.durations = key, iter(durations)

        def run(self, outputs, feed):
            assert outputs is None and feed == {'x': 1}
            order.append(self.key)
            clock[0] += next(self.durations)

    monkeypatch.setattr(time, 'perf_counter', lambda: clock[0])
    sessions = {'a': Session('a', [100, 100, 1, 5, 3]),
                'b': Session('b', [100, 100, 2, 2, 9])}
    found = interleaved_latency(sessions, {'x': 1}, runs=3, warmup=2)
    assert order == ['a', 'b'] * 5
    assert found == {'a': 3, 'b': 2}


def test_integer_kernel_counts_by_hand(tmp_path):
    """Counts of onnxruntime's integer kernels and of the Q/DQ nodes left,
    nothing else, on a graph written by hand."""
    from onnx import TensorProto, helper
    from mmcd.deploy import integer_kernel_counts
    nodes = [helper.make_node('QuantizeLinear', ['x', 's', 'z'], ['q']),
             helper.make_node('DequantizeLinear', ['q', 's', 'z'], ['d']),
             helper.make_node('Relu', ['d'], ['r']),
             helper.make_node('QuantizeLinear', ['r', 's', 'z'], ['q2']),
             helper.make_node('QLinearMatMul', ['q2', 's', 'z', 'q2', 's',
                                                'z', 's', 'z'], ['y'])]
    graph = helper.make_graph(
        nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT,
                                                   [2, 2])],
        [helper.make_tensor_value_info('y', TensorProto.UINT8, [2, 2])],
        [helper.make_tensor('s', TensorProto.FLOAT, [], [0.1]),
         helper.make_tensor('z', TensorProto.UINT8, [], [128])])
    path = str(tmp_path / 'g.onnx')
    onnx.save(helper.make_model(graph), path)
    assert integer_kernel_counts(path) == {
        'QLinearMatMul': 1, 'QuantizeLinear': 2, 'DequantizeLinear': 1}


def test_session_fuses_a_float_linear_and_keeps_a_qdq_one_integer(
        tmp_path):
    """``ort_session`` picks the optimizers by the graph: a float Linear's
    MatMul + Add becomes onnxruntime's Gemm (MatMulAddFusion on), the QDQ
    Linear of the tensorrt profile an integer kernel (it off, which a
    forced choice undoes)."""
    from mmcd.deploy.onnx_export import disabled_optimizers_for
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(3, 8)
    cfg = QuantConfig(8, 8, 'minmax', first_layer_bits=8,
                      profile='tensorrt')
    quantized = quantize_model(copy.deepcopy(float_model), cfg)
    calibrate(quantized, cfg, lambda: quantized(x))
    to_qdq(quantized, 'tensorrt')
    ops = {}
    for name, model, disabled in (('float', float_model, None),
                                  ('qdq', quantized, None),
                                  ('qdq_forced', quantized, ())):
        path = export_onnx(model, x, str(tmp_path / f'{name}.onnx'))
        optimized = str(tmp_path / f'{name}.opt.onnx')
        ort_session(path, optimized_path=optimized,
                    disabled_optimizers=disabled)
        ops[name] = [n.op_type for n in onnx.load(optimized).graph.node]
        assert disabled_optimizers_for(path) == (
            () if name == 'float' else ('MatMulAddFusion', ))
    assert 'Gemm' in ops['float'] and 'MatMul' not in ops['float']
    assert 'MatMulIntegerToFloat' in ops['qdq'] and 'Gemm' not in ops['qdq']
    assert 'MatMulIntegerToFloat' not in ops['qdq_forced']


@pytest.mark.parametrize('bits,folded', [(8, 2), (6, 2), (4, 0)])
def test_bias_folded_into_the_integer_kernel(bits, folded, tmp_path):
    """The default profile writes an 8-bit-container Linear as
    MatMulInteger -> Cast -> Mul(Mul(s_x, s_W)) -> Add(b), which onnxruntime
    fuses into MatMulIntegerToFloat with the bias inside (no Add left);
    outputs equal the QDQ form's and the simulation's. 4-bit containers
    keep the QDQ form."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(2, 5, 8)
    cfg = QuantConfig(bits, bits, 'minmax', first_layer_bits=bits)
    quantized = quantize_model(model, cfg)
    calibrate(quantized, cfg, lambda: quantized(x))
    simulated = quantized(x)
    to_qdq(quantized)
    outputs, ops = {}, {}
    for form in ('folded', 'qdq'):
        for layer in (quantized[0], quantized[2]):
            layer.bias_in_kernel = form == 'folded'
        path = export_onnx(quantized, x, str(tmp_path / f'{form}.onnx'))
        written = [n.op_type for n in onnx.load(path).graph.node]
        optimized = str(tmp_path / f'{form}.opt.onnx')
        session = ort_session(path, optimized_path=optimized)
        outputs[form] = session.run(None, {'input': x.numpy()})[0]
        ops[form] = [(n.op_type, len(n.input))
                     for n in onnx.load(optimized).graph.node]
        if form == 'folded':
            assert written.count('MatMulInteger') == folded
    np.testing.assert_allclose(outputs['folded'], outputs['qdq'], rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(outputs['folded'], simulated.detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    if folded:
        assert ops['folded'].count(('MatMulIntegerToFloat', 7)) == 2
        assert not any(op in ('Add', 'MatMulInteger') for op, _ in
                       ops['folded'])
        assert ('Add', 2) in ops['qdq']  # the QDQ form leaves the bias out


def test_compare_ptq_tools_errors(tmp_path):
    from test_tools_cli import (TOY_CONFIG, assert_one_line_error,
                                run_here)
    ckpt = tmp_path / 'model.pth'
    torch.save({}, ckpt)
    tool = 'tools/benchmarks/compare_ptq_tools.py'
    code, out = run_here(tool, TOY_CONFIG, str(ckpt), '--bits', '4')
    assert_one_line_error(code, out, "--bits 4: onnxruntime's and "
                          "ModelOpt's rows are 8-bit")
    code, out = run_here(tool, TOY_CONFIG, str(ckpt), '--runs', '0')
    assert_one_line_error(code, out, '--runs must be >= 1')
    code, out = run_here(tool, TOY_CONFIG, str(ckpt), '--mmcd', 'nope',
                         '--ort')
    assert_one_line_error(code, out, 'nope')
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError:
        code, out = run_here(tool, TOY_CONFIG, str(ckpt), '--modelopt',
                             'max')
        assert_one_line_error(code, out, '--modelopt needs nvidia-modelopt')


@pytest.mark.slow  # calibrates, quantizes three ways, evaluates three times
def test_compare_ptq_tools_rows(micro_run, tmp_path):
    """One run of the side-by-side benchmark on the micro detector: float,
    an mmcd method and onnxruntime's quantize_static each evaluated and
    timed on the same static shape; onnxruntime's file is a QDQ model
    with per-channel int8 weights, and its integer kernels are counted."""
    from test_tools_cli import run_tool
    config, ckpt = micro_run
    code, out = run_tool('tools/benchmarks/compare_ptq_tools.py', config,
                         ckpt, '--mmcd', 'minmax', '--ort', 'MinMax',
                         '--calib-images', '2', '--pad-to', '128',
                         '--runs', '1', '--out-dir', str(tmp_path),
                         timeout=600)
    assert code == 0, out
    result = json.loads((tmp_path / 'compare_ptq_tools.json').read_text())
    assert result['input_shape'] == [3, 128, 128]
    rows = result['rows']
    assert list(rows) == ['float', 'mmcd minmax', 'onnxruntime MinMax']
    for row in rows.values():
        assert 0 <= row['box_map'] <= 1 and 0 <= row['mask_map'] <= 1
        assert row['latency_ms'] > 0
    assert rows['float']['latency_ratio'] == 1
    assert not any(op.startswith('Q') for op in rows['float']['kernels'])
    ops = {n.op_type: n for n in onnx.load(
        rows['onnxruntime MinMax']['path']).graph.node}
    assert 'QuantizeLinear' in ops and 'DequantizeLinear' in ops
    assert '| onnxruntime MinMax |' in out


@pytest.mark.slow  # three end-to-end exports, quantized and evaluated
def test_compare_ptq_tools_whole_detector(micro_run, tmp_path):
    """``--scope detector``: float, an mmcd method and onnxruntime's
    quantize_static on the whole detector's end-to-end export, each
    evaluated in onnxruntime and timed; onnxruntime's file quantizes the
    heads' convolutions and FCs too (more QuantizeLinear nodes than the
    backbone + neck alone would need)."""
    from test_tools_cli import run_tool
    config, ckpt = micro_run
    code, out = run_tool('tools/benchmarks/compare_ptq_tools.py', config,
                         ckpt, '--scope', 'detector', '--mmcd', 'minmax',
                         '--ort', 'MinMax', 'Percentile', '--calib-images',
                         '2',
                         '--pad-to', '128', '--runs', '1', '--out-dir',
                         str(tmp_path), timeout=900)
    assert code == 0, out
    result = json.loads((tmp_path / 'compare_ptq_tools.json').read_text())
    assert result['scope'] == 'detector'
    rows = result['rows']
    assert list(rows) == ['float', 'mmcd minmax', 'onnxruntime MinMax',
                          'onnxruntime Percentile']
    # its histogram calibrator stacks the images' RoI tensors, whose sizes
    # differ: the row says so and the others are measured
    assert 'inhomogeneous shape' in rows.pop('onnxruntime Percentile')[
        'error']
    assert '| onnxruntime Percentile | failed: error: ' in out
    for row in rows.values():
        assert 0 <= row['box_map'] <= 1 and 0 <= row['mask_map'] <= 1
        assert row['latency_ms'] > 0
        graph = onnx.load(row['path']).graph
        assert [o.name for o in graph.output][:2] == ['dets', 'labels']
    ort_graph = onnx.load(rows['onnxruntime MinMax']['path']).graph
    quantized = {n.input[0] for n in ort_graph.node
                 if n.op_type == 'QuantizeLinear'}
    assert any('roi_head' in name or 'rpn' in name for name in quantized)
    assert 'whole detector in onnxruntime' in out


def test_onnxruntime_quantize_static_of_an_exported_model(tmp_path):
    """``ort_quantized``: onnxruntime's own QDQ model of a float export,
    calibrated on the images given: per-output-channel int8 weights with
    onnxruntime's symmetric scale ``max|w| / 127`` (written here from its
    documented rule), outputs within a few activation steps of float; an
    unknown calibration method is refused by name."""
    from onnx import numpy_helper
    from mmcd.deploy.other_tools import ort_quantized
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 2, 1))
    images = torch.rand(4, 3, 8, 8)
    path = export_onnx(Wrap(model), images[:1], str(tmp_path / 'f.onnx'))
    quantized = ort_quantized(path, images, 'MinMax')
    assert quantized == str(tmp_path / 'f_ort_minmax.onnx')
    graph = onnx.load(quantized).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weight_dq = [n for n in graph.node if n.op_type == 'DequantizeLinear'
                 and inits.get(n.input[0]) is not None
                 and inits[n.input[0]].dtype == np.int8]
    assert len(weight_dq) == 2
    for node, conv in zip(weight_dq, (model[0], model[2])):
        scale = inits[node.input[1]]
        expected = conv.weight.detach().abs().amax(dim=(1, 2, 3)) / 127
        np.testing.assert_allclose(scale, expected.numpy(), rtol=1e-6)
    with torch.no_grad():
        reference = model(images[:1])
    found = OnnxFeatures(quantized)(images[:1])[0]
    step = float(reference.abs().max()) / 127
    assert float((found - reference).abs().max()) < 4 * step
    with pytest.raises(ValueError, match="'KL': choose one of MinMax"):
        ort_quantized(path, images, 'KL')
