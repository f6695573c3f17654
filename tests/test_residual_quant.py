"""Residual additions quantized where TensorRT fuses them (the ``tensorrt``
profile): the Swin block's and the FPN's twins compute mmdet's modules in
float (PAFPN is left as it is), the residual input (only) is
fake-quantized on the profile's symmetric grid, the published methods
leave every addition in float, and a ``layer_bits`` rule that only names a
module left as it is stays an error."""
import copy

import pytest
import torch
import torch.nn.functional as F
from mmdet.models.backbones.swin import SwinBlock
from mmdet.models.necks import FPN, PAFPN
from torch import nn

import mmcd.models  # noqa: F401  (registers the Swin block's twin)
from mmcd.core import ConfigError
from mmcd.core.quant import (QuantConfig, QuantFPN, QuantResidualAdd,
                             QuantSwinBlock, ResidualAdd, calibrate,
                             fake_quantizers, quantize_model)
from mmcd.models import ViTDet


class OneBlock(nn.Module):
    def __init__(self, block, hw_shape):
        super().__init__()
        self.block, self.hw_shape = block, hw_shape

    def forward(self, x):
        return self.block(x, self.hw_shape)


def swin_block(shift=True, drop_path_rate=0.0, with_cp=False):
    torch.manual_seed(0)
    return SwinBlock(16, 2, 32, window_size=4, shift=shift,
                     drop_path_rate=drop_path_rate, with_cp=with_cp)


@pytest.mark.parametrize('shift', [False, True])
@pytest.mark.parametrize('training', [False, True])
def test_swin_block_twin_computes_mmdets_block(shift, training):
    """Float output (and gradient) of the twin = mmdet's SwinBlock, with
    padding (a 6x7 map, window 4), shifted windows and, in training,
    stochastic depth drawing the same random numbers."""
    block = swin_block(shift, drop_path_rate=0.3 if training else 0.0)
    block.train(training)
    twin = QuantSwinBlock(copy.deepcopy(block)).train(training)
    x = torch.randn(2, 6 * 7, 16, requires_grad=True)
    torch.manual_seed(1)
    ref = block(x, (6, 7))
    ref_grad, = torch.autograd.grad(ref.square().sum(), x)
    torch.manual_seed(1)
    out = twin(x, (6, 7))
    grad, = torch.autograd.grad(out.square().sum(), x)
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad)


def test_swin_block_twin_with_checkpointing():
    block = swin_block(with_cp=True).eval()
    twin = QuantSwinBlock(copy.deepcopy(block))
    x = torch.randn(1, 64, 16, requires_grad=True)
    assert torch.allclose(twin(x, (8, 8)), block(x, (8, 8)))


def test_residual_input_quantized_by_hand():
    """``minmax`` under ``tensorrt``: ``s = max|r| / 127`` (symmetric
    INT8), ``out = round(r / s) s + branch``; the branch is not
    quantized."""
    cfg = QuantConfig(8, 8, 'minmax', profile='tensorrt')
    model = quantize_model(Holder(ResidualAdd()), cfg)
    assert isinstance(model.add, QuantResidualAdd)
    residual = torch.tensor([[-2.54, 0.013, 1.0, 0.5]])
    branch = torch.tensor([[0.0011, -0.0023, 3.3, 100.0]])
    calibrate(model, cfg, lambda: model(residual, branch))
    step = 2.54 / 127
    expected = torch.round(residual / step) * step + branch
    assert torch.allclose(model(residual, branch), expected, atol=1e-6)
    assert not torch.equal(model(residual, branch), residual + branch)


class Holder(nn.Module):
    def __init__(self, add):
        super().__init__()
        self.add = add

    def forward(self, residual, branch):
        return self.add(residual, branch)


@pytest.mark.parametrize('method', ['minmax', 'repq-vit', 'dopq-vit'])
def test_published_methods_leave_additions_in_float(method):
    """Only a profile that quantizes residual additions takes the blocks
    over: as published (RepQ-ViT's code), additions stay float."""
    model = OneBlock(swin_block(), (8, 8))
    quantized = quantize_model(copy.deepcopy(model), QuantConfig(8, 8,
                                                                 method))
    assert type(quantized.block) is SwinBlock
    assert not any(isinstance(m, (QuantResidualAdd, QuantSwinBlock))
                   for m in quantized.modules())
    trt = quantize_model(copy.deepcopy(model), QuantConfig(
        8, 8, method, profile='tensorrt'))
    assert isinstance(trt.block, QuantSwinBlock)
    adds = [n for n, m in trt.named_modules()
            if isinstance(m, QuantResidualAdd)]
    assert adds == ['block.attn_residual', 'block.ffn_residual']
    # the block's own modules keep their names (CD's and reparameterization
    # rules, checkpoint keys)
    assert set(trt.state_dict()) >= set(model.state_dict())


def test_vitdet_blocks_add_through_residual_modules():
    vit = ViTDet(img_size=64, patch_size=16, embed_dims=32, depth=2,
                 num_heads=2, window_size=2, global_attn_indexes=(1, ),
                 pretrain_img_size=64)
    assert not any('residual' in key for key in vit.state_dict())
    quantized = quantize_model(copy.deepcopy(vit), QuantConfig(
        8, 8, 'repq-vit', profile='tensorrt'))
    assert sum(isinstance(m, QuantResidualAdd)
               for m in quantized.modules()) == 2 * 2
    plain = quantize_model(copy.deepcopy(vit), QuantConfig(8, 8, 'repq-vit'))
    assert sum(isinstance(m, ResidualAdd) for m in plain.modules()) == 4
    assert not any(isinstance(m, QuantResidualAdd) for m in plain.modules())


def test_layer_bits_naming_only_a_module_left_as_it_is():
    """A rule whose pattern names only the block, which the default profile
    leaves unconverted, matches no quantized layer: refused, not a silent
    no-op."""
    model = OneBlock(swin_block(), (8, 8))
    with pytest.raises(ConfigError, match=r"\['block\$'\] match no "
                       'quantized layer'):
        quantize_model(copy.deepcopy(model), QuantConfig(
            8, 8, layer_bits=[dict(pattern='block$', a_bits=6)]))
    assert fake_quantizers(quantize_model(copy.deepcopy(model), QuantConfig(
        8, 8, profile='tensorrt',
        layer_bits=[dict(pattern='block$', a_bits=8)])))


def fpn(**options):
    torch.manual_seed(0)
    options = dict(dict(in_channels=[4, 8, 16], out_channels=8, num_outs=5),
                   **options)
    return options.pop('cls', FPN)(**options).eval()


def fpn_inputs():
    # odd sizes: the upsampled level is cropped to the finer one's size
    return [torch.randn(2, c, s, s + 1) for c, s in ((4, 15), (8, 8), (16, 4))]


@pytest.mark.parametrize('options', [
    dict(),  # Mask R-CNN's: extra level by max pooling
    dict(add_extra_convs='on_input', num_outs=5),
    dict(add_extra_convs='on_lateral', relu_before_extra_convs=True),
    dict(add_extra_convs='on_output', start_level=1, num_outs=4),
    dict(upsample_cfg=dict(scale_factor=2, mode='nearest'),
         in_channels=[4, 8], num_outs=2),
])
def test_fpn_twin_computes_mmdets_fpn(options):
    """Each extra-level source, a start level, a fixed scale factor: the
    twin's outputs equal mmdet's FPN bit for bit, in float."""
    neck = fpn(**options)
    inputs = fpn_inputs()[:len(neck.in_channels)]
    if 'scale_factor' in options.get('upsample_cfg', {}):
        inputs = [torch.randn(2, 4, 16, 16), torch.randn(2, 8, 8, 8)]
    twin = QuantFPN(copy.deepcopy(neck))
    with torch.no_grad():
        ref, out = neck(inputs), twin(inputs)
    assert len(out) == len(ref) == neck.num_outs
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert set(twin.state_dict()) == set(neck.state_dict())


class Neck(nn.Module):
    def __init__(self, neck):
        super().__init__()
        self.neck = neck

    def forward(self, inputs):
        return self.neck(inputs)


def test_fpn_top_down_merges_quantized_under_tensorrt():
    """Under ``tensorrt`` each top-down merge quantizes the upsampled
    coarser level (the residual) on the symmetric INT8 grid, not the
    lateral convolution's output: the finest output is ``fpn_conv_0(l_0 +
    Q_0(up(l_1)))`` with ``l_1 = lateral_1(c_1) + Q_1(up(l_2))``; the
    published methods keep mmdet's FPN."""
    inputs = fpn_inputs()
    for method in ('minmax', 'repq-vit'):
        plain = quantize_model(Neck(fpn()), QuantConfig(8, 8, method))
        assert type(plain.neck) is FPN
    cfg = QuantConfig(8, 8, 'minmax', profile='tensorrt')
    trt = quantize_model(Neck(fpn()), cfg)
    assert isinstance(trt.neck, QuantFPN)
    adds = [n for n, m in trt.named_modules()
            if isinstance(m, QuantResidualAdd)]
    assert adds == ['neck.top_down_adds.0', 'neck.top_down_adds.1']
    calibrate(trt, cfg, lambda: trt(inputs))
    neck = trt.neck

    def q(x, add):
        s = float(add.residual_quantizer.scale)
        return torch.clamp(torch.round(x / s), -128, 127) * s

    def up(x, like):
        return F.interpolate(x, size=like.shape[2:], mode='nearest')

    with torch.no_grad():
        laterals = [conv(x) for conv, x in zip(neck.lateral_convs, inputs)]
        laterals[1] = laterals[1] + q(up(laterals[2], laterals[1]),
                                      neck.top_down_adds[1])
        laterals[0] = laterals[0] + q(up(laterals[1], laterals[0]),
                                      neck.top_down_adds[0])
        expected = neck.fpn_convs[0](laterals[0])
        out = trt(inputs)[0]
        float_merges = neck.fpn_convs[0](
            neck.lateral_convs[0](inputs[0]) + up(neck.lateral_convs[1](
                inputs[1]) + up(neck.lateral_convs[2](inputs[2]), inputs[1]),
                inputs[0]))
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, float_merges, atol=1e-4)


def test_fpn_subclass_with_its_own_forward_left_as_it_is():
    """PAFPN (an FPN with a bottom-up path) computes another function: the
    profile does not take it over, and it computes what it did."""
    neck = fpn(cls=PAFPN)
    trt = quantize_model(Neck(copy.deepcopy(neck)), QuantConfig(
        8, 8, 'minmax', profile='tensorrt'))
    assert type(trt.neck) is PAFPN
    inputs = [torch.randn(2, c, s, s) for c, s in ((4, 16), (8, 8), (16, 4))]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(trt(inputs),
                                                     neck(inputs)))
