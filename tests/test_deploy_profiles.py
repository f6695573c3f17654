"""Deployment profiles (mmcd.core.quant.profiles): the tensorrt profile's
symmetric INT8 grid by hand, what it changes in a method, its refusals, its
QDQ export (int8, zero point 0) bit for bit in onnxruntime, the TensorRT
rule check (mmcd.deploy.tensorrt_check) on hand-built graphs, and the
onnxruntime-integer profile's all-integer export."""
import copy

import numpy as np
import onnx
import pytest
import torch
from mmdet.models.backbones.swin import SwinBlock
from mmdet.structures import DetDataSample
from mmengine.registry import init_default_scope
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from mmcd.core import ConfigError
from mmcd.core.quant import (DEPLOY_PROFILES, QuantConfig, UniformQuantizer,
                             calibrate, fake_quantizers, quantize_model)
from mmcd.core.quant.qdq import ActivationQDQ, to_qdq
from mmcd.deploy import (FeatureExtractor, OnnxFeatures, RuntimeDraw,
                         export_onnx, tensorrt_problems)
from mmcd.utils.benchmark_models import build_detector

TOY = 'configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py'


def test_symmetric_grid_by_hand():
    # 4 bits, min-max range of [-0.7, 0.1, 1.4]: s = 1.4 / 7 = 0.2; signed
    # levels -8..7: x / s = -3.5 0.5 7 -> round half to even -4 0 7
    q = UniformQuantizer(4, None, 'minmax', symmetric=True)
    q.set_state('calib')
    out = q(torch.tensor([-0.7, 0.1, 1.4]))
    torch.testing.assert_close(q.scale, torch.tensor(0.2))
    assert float(q.zero_point) == 8  # signed 0 on unsigned codes
    torch.testing.assert_close(out, torch.tensor([-0.8, 0.0, 1.4]))
    # beyond the range: clamped to the signed levels -8 and 7
    torch.testing.assert_close(q(torch.tensor([-9.0, 9.0])),
                               torch.tensor([-1.6, 1.4]))


def test_symmetric_quantile_search_picks_the_best_symmetric_candidate():
    """RepQ-ViT's clip quantiles under the symmetric grid: the scale is
    max(|Q(1-p)|, |Q(p)|) / 127 for the p of least squared error."""
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((20000, )) + 0.5
    q = UniformQuantizer(8, None, 'quantile', symmetric=True)
    q.set_state('calib')
    q(x)

    def error(scale):
        fake = torch.clamp(torch.round(x / scale), -128, 127) * scale
        return float(((fake - x)**2).sum())

    candidates = []
    for p in (0.999, 0.9999, 0.99999):
        lo, hi = torch.quantile(x.double(), torch.tensor(
            [1 - p, p], dtype=torch.float64))
        candidates.append(float(max(abs(lo), abs(hi))) / 127)
    best = min(candidates, key=error)
    assert float(q.scale) == pytest.approx(best, rel=1e-5)
    assert float(q.zero_point) == 128


@pytest.mark.parametrize('method', ['repq-vit', 'dopq-vit', 'minmax'])
def test_tensorrt_profile_changes_the_method(method):
    resolved = QuantConfig(8, 8, method, profile='tensorrt').resolved_method
    assert resolved.symmetric and resolved.softmax == 'uniform'
    assert resolved.residual_adds and resolved.name == f'{method}@tensorrt'
    plain = QuantConfig(8, 8, method).resolved_method
    assert not plain.symmetric and plain.name == method
    assert not plain.residual_adds


@pytest.mark.parametrize('method,changed', [
    ('repq-vit', True), ('dopq-vit', True), ('minmax', False)])
def test_onnxruntime_integer_profile_changes_the_method(method, changed):
    """Uniform post-softmax quantizer, RepQ-ViT's target zero point rounded
    (methods that reparameterize), asymmetric grids kept."""
    resolved = QuantConfig(4, 4, method,
                           profile='onnxruntime-integer').resolved_method
    assert resolved.softmax == 'uniform' and not resolved.symmetric
    assert resolved.integer_target == resolved.reparameterize
    assert (resolved.name == f'{method}@onnxruntime-integer') == changed
    assert not QuantConfig(4, 4, method).resolved_method.integer_target


def test_refusals():
    with pytest.raises(ConfigError, match=r"runs 8-bit integers only, not "
                       r"the 4-bit of a_bits=4, w_bits=4: choose w8a8"):
        QuantConfig(4, 4, profile='tensorrt')
    with pytest.raises(ValueError, match='unknown deployment profile '
                       "'trt'; registered: onnxruntime, onnxruntime-integer, "
                       'tensorrt'):
        QuantConfig(8, 8, profile='trt')
    # per layer: a rule sending layers to 4 bits is refused naming them,
    # before anything is converted
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    cfg = QuantConfig(8, 8, profile='tensorrt',
                      layer_bits=[dict(pattern='^1$', a_bits=4)])
    with pytest.raises(ConfigError, match=r'not the 4-bit of 1: choose'):
        quantize_model(model, cfg)
    assert not fake_quantizers(model)
    quantize_model(model, QuantConfig(
        8, 8, profile='tensorrt', layer_bits=[dict(pattern='^1$', w_bits=8)]))


def calibrated_toy(profile='tensorrt'):
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = build_detector(TOY)
    images = torch.randn(2, 3, 128, 128)
    meta = dict(img_shape=(128, 128), ori_shape=(128, 128),
                pad_shape=(128, 128), scale_factor=(1.0, 1.0),
                batch_input_shape=(128, 128))
    cfg = QuantConfig(8, 8, 'repq-vit', profile=profile)
    quant = quantize_model(copy.deepcopy(model), cfg)
    summary = calibrate(quant, cfg, lambda: quant.predict(
        images, [DetDataSample(metainfo=meta) for _ in range(2)]))
    return model, quant, images, summary


def test_tensorrt_profile_on_the_toy_detector(tmp_path):
    """Every grid of the calibrated toy detector is symmetric (zero point
    2^(b-1)), RepQ-ViT's reparameterization keeps no shift, the post-softmax
    quantizers are uniform; the QDQ model is the simulation, its export
    holds int8 zero points of 0 only, passes the TensorRT check, quantizes
    the residual input of every Swin block's additions and of the FPN's
    top-down merges, and
    onnxruntime computes it as close as a runtime draw of the simulation
    (the default profile's uint8 grids fail the check: hand-built graphs
    below)."""
    model, quant, images, summary = calibrated_toy()
    assert summary['reparameterized'] > 0
    quantizers = fake_quantizers(quant)
    assert quantizers and all(isinstance(q, UniformQuantizer)
                              for q in quantizers)
    for q in quantizers:
        assert q.symmetric and torch.all(q.zero_point == 128), q.layer_name
        assert q.channel_offset.numel() == 0, q.layer_name
    qdq = copy.deepcopy(quant)
    report = to_qdq(qdq)
    assert report['float_formula'] == report['fractional_zero'] == []
    assert all(m.signed and torch.all(m.zero_point == 0)
               for m in qdq.modules() if isinstance(m, ActivationQDQ))
    x = images[:1]
    with torch.no_grad():
        fake = FeatureExtractor(quant)(x)
        assert all(torch.equal(a, b)
                   for a, b in zip(FeatureExtractor(qdq)(x), fake))
    path = export_onnx(FeatureExtractor(qdq), x, str(tmp_path / 't.onnx'))
    assert tensorrt_problems(path) == []
    graph = onnx.load(path).graph
    # TensorRT's placement: Q/DQ on the residual input of both additions of
    # every Swin block and on the upsampled input of each FPN top-down
    # merge, the branch (a weighted layer's output) unquantized
    blocks = sum(isinstance(m, SwinBlock) for m in model.modules())
    merges = len(model.neck.lateral_convs) - 1
    dequantized = {n.output[0] for n in graph.node
                   if n.op_type == 'DequantizeLinear'}
    adds = [n for n in graph.node if n.op_type == 'Add' and
            any(i in dequantized for i in n.input)]
    assert blocks == 5 and merges == 3 and len(adds) == 2 * blocks + merges
    assert all(sum(i in dequantized for i in n.input) == 1 for n in adds)
    weights = [i for i in graph.initializer if len(i.dims) > 1 and
               i.data_type == TensorProto.INT8]
    assert len(weights) == len([n for n in report['integer_weights']
                                if n.startswith(('backbone.', 'neck.'))])
    # onnxruntime's integer kernels are another draw of the rounding noise
    # (random weights flip easily): no farther from the simulation than a
    # runtime draw of it, on average and at the farthest value (measured
    # here: 0.26 vs 0.27-0.37 steps on average at the first level; a flip
    # in a quantized FPN merge moves a value by 3 steps, in a draw too)
    step = float(quant.rpn_head.rpn_conv.input_quantizer.scale)
    with torch.no_grad():
        drawn = RuntimeDraw(quant, seed=1)(x)
    for a, b, d in zip(OnnxFeatures(path)(x), fake, drawn):
        assert float((a - b).abs().mean()) <= \
            1.5 * float((d - b).abs().mean()) + 1e-3 * step
        assert float((a - b).abs().max()) <= \
            1.5 * float((d - b).abs().max()) + 1e-3 * step


def test_onnxruntime_integer_profile_on_the_toy_detector(tmp_path):
    """Under ``onnxruntime-integer`` RepQ-ViT's toy detector has no float
    formula left (the default profile has both kinds: fractional target
    zero points, log-sqrt2); its QDQ form folds each reparameterized
    Linear's shift into the bias (as close to the simulation as a runtime
    draw), so onnxruntime fuses every quantized layer of the backbone +
    neck into an integer kernel: no MatMulNBits (a float-accuracy matmul
    on integer weights), no DequantizeLinear left."""
    from mmcd.deploy import integer_kernel_counts, ort_session
    _, published, _, _ = calibrated_toy('onnxruntime')
    report = to_qdq(copy.deepcopy(published), 'onnxruntime')
    assert report['float_formula'] and report['fractional_zero']
    _, quant, images, summary = calibrated_toy('onnxruntime-integer')
    assert summary['reparameterized'] > 0
    for q in fake_quantizers(quant):
        assert isinstance(q, UniformQuantizer) and not q.symmetric
        assert torch.equal(q.zero_point, q.zero_point.round()), q.layer_name
    qdq = copy.deepcopy(quant)
    report = to_qdq(qdq, 'onnxruntime-integer')
    assert report['float_formula'] == report['fractional_zero'] == []
    x = images[:1]
    with torch.no_grad():
        fake = FeatureExtractor(quant)(x)
        drawn = RuntimeDraw(quant, seed=1)(x)
        for a, b, d in zip(FeatureExtractor(qdq)(x), fake, drawn):
            # the shift folded into the bias: float rounding apart, which
            # flips a value on a level boundary as a runtime draw does
            assert float((a - b).abs().mean()) <= \
                1.5 * float((d - b).abs().mean()) + 1e-6
    path = export_onnx(FeatureExtractor(qdq), x, str(tmp_path / 'i.onnx'))
    optimized = str(tmp_path / 'opt.onnx')
    ort_session(path, optimized_path=optimized)
    counts = integer_kernel_counts(optimized)
    assert counts.get('MatMulIntegerToFloat', 0) > 0
    assert 'MatMulNBits' not in counts and 'DequantizeLinear' not in counts


def qdq_graph(zero, scale, axis=None, weight=None, consumer='MatMul'):
    """x -> QuantizeLinear -> DequantizeLinear -> (consumer with a weight
    through its own DequantizeLinear, if ``weight``)."""
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), 's'),
             numpy_helper.from_array(zero, 'z')]
    nodes = [helper.make_node('QuantizeLinear', ['x', 's', 'z'], ['q'],
                              name='q'),
             helper.make_node('DequantizeLinear', ['q', 's', 'z'], ['xd'],
                              name='dq')]
    out = 'xd'
    if weight is not None:
        w_int, w_scale = weight
        inits += [numpy_helper.from_array(w_int, 'w'),
                  numpy_helper.from_array(w_scale.astype(np.float32), 'ws'),
                  numpy_helper.from_array(np.zeros(w_scale.shape, np.int8),
                                          'wz')]
        nodes.append(helper.make_node('DequantizeLinear', ['w', 'ws', 'wz'],
                                      ['wd'], name='wdq', axis=axis))
        nodes.append(helper.make_node(consumer, ['xd', 'wd'], ['y'],
                                      name='mm'))
        out = 'y'
    graph = helper.make_graph(
        nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT,
                                                   [2, 4])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph,
                             opset_imports=[helper.make_opsetid('', 21)])


def check(model, tmp_path):
    path = str(tmp_path / 'g.onnx')
    onnx.save(model, path)
    return tensorrt_problems(path)


def test_tensorrt_check_on_hand_built_graphs(tmp_path):
    int8_zero = np.zeros((), np.int8)
    assert check(qdq_graph(int8_zero, 0.1), tmp_path) == []
    found = check(qdq_graph(np.array(3, np.uint8), 0.1), tmp_path)
    assert len(found) == 2 and 'got UINT8 [3]' in found[0]
    found = check(qdq_graph(np.array(1, np.int8), 0.1), tmp_path)
    assert len(found) == 2 and 'got INT8 [1]' in found[0]
    found = check(qdq_graph(np.zeros(4, np.int8), [0.1] * 4), tmp_path)
    assert any('per-channel scales on an activation' in p for p in found)
    # a MatMul weight [in=4, out=3]: per-channel along its last axis
    weight = (np.ones((4, 3), np.int8), np.full(3, 0.5))
    assert check(qdq_graph(int8_zero, 0.1, 1, weight), tmp_path) == []
    weight = (np.ones((4, 3), np.int8), np.full(4, 0.5))
    found = check(qdq_graph(int8_zero, 0.1, 0, weight), tmp_path)
    assert len(found) == 1 and 'along axis 0 into MatMul' in found[0]


def test_profiles_are_registered_by_name():
    assert DEPLOY_PROFILES.names() == ['onnxruntime', 'onnxruntime-integer',
                                       'tensorrt']
    assert DEPLOY_PROFILES.get('tensorrt').bits == (8, )
