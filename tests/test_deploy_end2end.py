"""The end-to-end export through mmdeploy (mmcd.deploy.end2end) and the
compatibility of mmdeploy 1.3.1 with current PyTorch
(mmcd.compat.mmdeploy_torch)."""
import copy
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto
import torch
from mmengine.config import Config
from torch import nn

from mmcd.compat.mmdeploy_torch import torchscript_export
from mmcd.core.quant import QuantConfig, calibrate, quantize_model
from mmcd.core.quant.qdq import to_qdq
from mmcd.deploy.end2end import (deploy_config, end2end_detector,
                                 register_symbolics)
from mmcd.deploy.onnx_export import ort_session

TOY_CONFIG = 'configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py'
#: Mask R-CNN, and (slow) the Swin repository's Cascade Mask R-CNN, whose
#: heads regress per class
DETECTORS = [TOY_CONFIG, pytest.param(
    'configs/toy/cascade-mask-rcnn_swin-toy-p4-w7_fpn_giou-4conv1f_12e_'
    'toy-coco_cd.py', marks=pytest.mark.slow, id='cascade')]


def torchscript_onnx(module, x, path, opset=17):
    register_symbolics(opset)
    with torchscript_export(), torch.no_grad():
        torch.onnx.export(module.eval(), (x, ), path, opset_version=opset,
                          input_names=['input'])
    return path


def run_onnx(path, x):
    session = ort_session(path)
    return torch.from_numpy(session.run(None, {'input': x.numpy()})[0])


@pytest.mark.parametrize('bits', [3, 4, 8])
def test_torchscript_qdq_activation_bit_for_bit(bits, tmp_path):
    """The TorchScript symbolic of ``mmcd::quantize_dequantize``: uint8
    QuantizeLinear/DequantizeLinear, clipped to the 2^b levels below 8 bits,
    is the fake quantizer in onnxruntime bit for bit (written by hand:
    ``(clamp(round(x / s) + z, 0, 2^b - 1) - z) s``)."""
    from mmcd.core.quant import UniformQuantizer
    from mmcd.core.quant.qdq import ActivationQDQ
    torch.manual_seed(bits)
    x = torch.randn(1, 4, 8, 8) * 3
    quantizer = UniformQuantizer(bits)
    scale, zero = 7.0 / 2**bits, float(2**(bits - 1))
    quantizer.set_params(torch.tensor(scale), torch.tensor(zero))
    expected = (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) -
                zero) * scale
    path = torchscript_onnx(ActivationQDQ(quantizer), x,
                            str(tmp_path / 'a.onnx'))
    assert torch.equal(run_onnx(path, x), expected)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count('QuantizeLinear') == 1 and ('Clip' in ops) == (bits != 8)


@pytest.mark.parametrize('bits', [3, 8])
def test_torchscript_signed_qdq_bit_for_bit(bits, tmp_path):
    """A symmetric quantizer (the tensorrt profile) exports with an int8
    zero point of 0 and computes ``clamp(round(x / s), -2^(b-1),
    2^(b-1) - 1) s`` (written by hand) in onnxruntime, bit for bit."""
    from mmcd.core.quant import UniformQuantizer
    from mmcd.core.quant.qdq import ActivationQDQ
    torch.manual_seed(bits)
    x = torch.randn(1, 4, 8, 8) * 3
    quantizer = UniformQuantizer(bits, None, 'minmax', symmetric=True)
    quantizer.set_state('calib')
    quantizer(x[:, :2])  # a range narrower than x: values get clamped
    scale, half = quantizer.scale, 2**(bits - 1)
    expected = torch.clamp(torch.round(x / scale), -half, half - 1) * scale
    path = torchscript_onnx(ActivationQDQ(quantizer), x,
                            str(tmp_path / 's.onnx'))
    assert torch.equal(run_onnx(path, x), expected)
    graph = onnx.load(path).graph
    zeros = [i for i in graph.initializer if i.data_type == TensorProto.INT8]
    assert zeros and all(not onnx.numpy_helper.to_array(z).any()
                         for z in zeros)


@pytest.mark.parametrize('bits,profile', [(2, 'onnxruntime'),
                                          (4, 'onnxruntime'),
                                          (8, 'onnxruntime'),
                                          (8, 'tensorrt')])
def test_torchscript_integer_weights_carried(bits, profile, tmp_path):
    """Integer weights of every width are int8 initializers holding the same integers, dequantized per output channel;
    the exported Conv and Linear compute the QDQ model's output (each layer
    alone: a later layer would see rounding flips of its input
    quantizer)."""
    from test_deploy import calibrated_conv_linear
    model, x = calibrated_conv_linear(bits, seed=bits, profile=profile)
    to_qdq(model)
    with torch.no_grad():
        inputs_of = ((0, x[:1]), (3, model[:3](x[:1])))
    for index, inputs in inputs_of:
        layer = model[index]
        path = torchscript_onnx(layer, inputs, str(tmp_path / f'{index}.onnx'))
        with torch.no_grad():
            expected = layer(inputs)
        torch.testing.assert_close(run_onnx(path, inputs), expected,
                                   rtol=1e-5, atol=1e-5)
        graph = onnx.load(path).graph
        stored = [onnx.numpy_helper.to_array(i) for i in graph.initializer
                  if list(i.dims) == list(layer.weight_int.shape)]
        assert len(stored) == 1 and stored[0].dtype == np.int8
        assert np.array_equal(stored[0], layer.weight_int.numpy())
        assert -2**(bits - 1) <= int(stored[0].min()) and \
            int(stored[0].max()) <= 2**(bits - 1) - 1


def test_conv_stack_not_requantized_with_a_rounded_bias(tmp_path):
    """Conv -> ReLU -> quantized Conv: onnxruntime would fuse the first
    into QLinearConv and round its float bias to int32 at s_x * s_w, a
    quantization the model does not contain (values of the next 4-bit
    input one step away); the export adds the bias after the convolution,
    so the stack computes the QDQ model's output to float rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 8, 3, padding=1))
    with torch.no_grad():
        model[0].bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 16, 14, 14)
    cfg = QuantConfig(4, 4, 'minmax', first_layer_bits=4)
    quantize_model(model, cfg)
    calibrate(model, cfg, lambda: model(x))
    to_qdq(model)
    with torch.no_grad():
        expected = model(x)
    path = torchscript_onnx(model, x, str(tmp_path / 'stack.onnx'))
    torch.testing.assert_close(run_onnx(path, x), expected, rtol=1e-5,
                               atol=1e-5)


def test_rewriter_exit_with_torch_fx_dict_registry():
    """torch.fx's registry of wrapped functions is a dict: mmdeploy's
    rewriter context pops from its end on exit (``KeyError: -1``, which
    hides the export's own error); within :func:`torchscript_export` the
    entries added during the block are removed and the others kept."""
    from mmdeploy.core import RewriterContext
    from torch.fx import _symbolic_trace
    registry = _symbolic_trace._wrapped_fns_to_patch
    assert isinstance(registry, dict)
    before = dict(registry)
    context = RewriterContext(cfg={}, backend='onnxruntime')
    context.enter()
    registry[(0, 'added_during_export')] = {}
    with pytest.raises(KeyError):
        context.exit()  # mmdeploy's own exit: fails before restoring
    registry.pop((0, 'added_during_export'))
    context.exit()  # now restores mmdeploy's rewritten functions
    with torchscript_export():
        with RewriterContext(cfg={}, backend='onnxruntime'):
            registry[(0, 'added_during_export')] = {}
    assert registry == before
    # and everything is restored after the block
    from mmdeploy.core.rewriters.function_rewriter import FunctionRewriter
    import torch.onnx.symbolic_opset9 as opset9
    assert FunctionRewriter.exit.__name__ == 'exit'
    assert not hasattr(FunctionRewriter.exit, '__wrapped__')
    assert not hasattr(opset9, '_cast_Long')


def test_deploy_config_takes_the_detectors_test_cfg():
    cfg = Config.fromfile(TOY_CONFIG)
    rcnn = cfg.model.test_cfg.rcnn
    post = deploy_config(cfg).codebase_config.post_processing
    assert (post.iou_threshold, post.keep_top_k,
            post.max_output_boxes_per_class) == \
        (rcnn.nms.iou_threshold, rcnn.max_per_img, rcnn.max_per_img)
    assert post.score_threshold == 0  # mmdeploy's RPN reads it; mmdet's
    # RPN has none (the RoI head's comes from test_cfg.rcnn)
    assert deploy_config(cfg).onnx_config.output_names == ['dets', 'labels',
                                                           'masks']
    dino = Config.fromfile(
        'configs/toy/dino-5scale_swin-toy_12e_toy-coco_cd.py')
    with pytest.raises(ValueError, match='--scope features'):
        deploy_config(dino)


def toy_detector_and_image(config=TOY_CONFIG):
    from mmdet.structures import DetDataSample
    from mmengine.registry import init_default_scope

    from mmcd.utils.benchmark_models import build_detector
    init_default_scope('mmdet')
    torch.manual_seed(0)
    detector = build_detector(config)
    image = torch.randn(1, 3, 64, 96)  # no padding: img_shape = its shape
    sample = DetDataSample(metainfo=dict(
        img_shape=(64, 96), ori_shape=(64, 96), pad_shape=(64, 96),
        batch_input_shape=(64, 96), scale_factor=(1.0, 1.0)))
    return detector, image, sample


@pytest.mark.parametrize('config', DETECTORS)
def test_exported_function_is_mmdets_post_processing(config):
    """On an unpadded image the detector as exported (PyTorch under
    mmdeploy's rewriters and mmcd's) detects what mmdet's own predict
    does: the RPN's NMS per level, every class with its own regressed
    box, Cascade's stages refined by class (mmdeploy alone: one NMS over
    all levels, one box per RoI, class-agnostic cascades only)."""
    from mmcd.deploy import changed_detections
    detector, image, sample = toy_detector_and_image(config)
    cfg = Config.fromfile(config)
    with torch.no_grad():
        reference = detector.predict(image, [copy.deepcopy(sample)])[0]
    exported = end2end_detector(detector, cfg, runtime='pytorch')
    found = exported(image, [copy.deepcopy(sample)])[0]
    ours, theirs = (r.pred_instances for r in (found, reference))
    assert len(theirs) > 20  # random weights: plenty of detections
    changed = changed_detections(
        [(theirs.bboxes, theirs.scores, theirs.labels)],
        [(ours.bboxes, ours.scores, ours.labels)])
    assert changed['changed'] == 0, changed
    torch.testing.assert_close(ours.scores.sort().values,
                               theirs.scores.sort().values)


@pytest.mark.parametrize('config', DETECTORS)
def test_end_to_end_float_export_is_the_rewritten_model(config, tmp_path):
    """The toy Mask R-CNN exported end to end (RoiAlign, TopK,
    NonMaxSuppression: standard ops) computes in onnxruntime what the same
    model computes in PyTorch under the rewriters, to float rounding; the
    image's detections survive the round trip."""
    detector, image, sample = toy_detector_and_image(config)
    cfg = Config.fromfile(config)
    exported = end2end_detector(detector, cfg, out_dir=str(tmp_path),
                                prefix='float')
    found = exported.outputs(image, sample)
    reference = end2end_detector(detector, cfg,
                                 runtime='pytorch').outputs(image, sample)
    ops = {n.op_type for n in onnx.load(exported.path_for(image)).graph.node}
    assert {'RoiAlign', 'TopK', 'NonMaxSuppression'} <= ops
    assert not {n.domain for n in onnx.load(
        exported.path_for(image)).graph.node} - {''}
    assert [f.shape for f in found] == [r.shape for r in reference]
    assert found[0].shape[1] > 0  # detections to compare
    for a, b in zip(found, reference):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4,
                                   atol=1e-3)
    # a file made elsewhere (another tool's quantization of it) runs for
    # its own shape and refuses others instead of exporting the float model
    again = end2end_detector(detector, cfg, out_dir=str(tmp_path),
                             prefix='other')
    again.use_file(exported.path_for(image))
    for a, b in zip(again.outputs(image, sample), found):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r'takes images of \[1, 3, 64, 96\], '
                       r'got one of \[1, 3, 64, 64\]: pad every image'):
        again.outputs(image[..., :64].contiguous(), sample)
    assert not (tmp_path / 'other_64x64.onnx').exists()


def test_end2end_detector_bad_runtime():
    cfg = Config.fromfile(TOY_CONFIG)
    with pytest.raises(ValueError, match='onnxruntime or pytorch'):
        end2end_detector(nn.Module(), cfg, runtime='tensorrt')


@pytest.mark.slow  # the whole detector exported and evaluated twice
def test_export_tool_whole_detector(micro_run, tmp_path):
    """``export_onnx.py --scope detector --eval``: the float export's
    detections are those of the same model in PyTorch (as exported), and
    the quantized one is measured against its draws."""
    from test_tools_cli import run_tool
    config, ckpt = micro_run
    code, out = run_tool('tools/deploy/export_onnx.py', config, ckpt,
                         '--quant', 'w8a8', '--calib-images', '2',
                         '--scope', 'detector', '--eval', '--draws', '2',
                         '--out-dir', str(tmp_path), timeout=900)
    assert code == 0, out
    result = json.loads((tmp_path / 'export.json').read_text())
    assert result['scope'] == 'detector' and result['opset'] == 17
    changed = result['map']['detections']
    assert changed['float onnxruntime']['changed'] == 0
    assert changed['onnxruntime']['reference'] == 'sim rewritten'
    assert set(result['map']['standard_scores']) == {'coco/bbox_mAP',
                                                     'coco/segm_mAP'}
    assert len(result['map']['draws']) == 2
    assert 'onnxruntime end to end' in out
