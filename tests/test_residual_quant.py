"""Residual additions quantized where TensorRT fuses them (the ``tensorrt``
profile): the Swin block's twin computes mmdet's block in float, the
residual input (only) is fake-quantized on the profile's symmetric grid,
the published methods leave every addition in float, and a ``layer_bits``
rule that only names a module left as it is stays an error."""
import copy

import pytest
import torch
from mmdet.models.backbones.swin import SwinBlock
from torch import nn

import mmcd.models  # noqa: F401  (registers the Swin block's twin)
from mmcd.core import ConfigError
from mmcd.core.quant import (QuantConfig, QuantResidualAdd, QuantSwinBlock,
                             ResidualAdd, calibrate, fake_quantizers,
                             quantize_model)
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
