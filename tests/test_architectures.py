"""Architecture specs and quantized twins: registered once, found by name
(specs) or by class (twins); the model of docs/en/extending.md's backbone
example (test_extending.py registers its spec)."""
import copy

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from torch import nn

from mmcd.core import ARCHITECTURES, ArchitectureSpec
from mmcd.core.quant import MatMul, QuantConfig, quantize_model


class Mixer(nn.Module):
    """Attention under other names: fused ``in_proj``, ``out_proj``."""

    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.in_proj, self.out_proj = nn.Linear(dim, 3 * dim), nn.Linear(
            dim, dim)
        self.qk, self.av = MatMul('qk'), MatMul('av')

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.in_proj(x).view(b, n, 3, self.num_heads, -1).permute(
            2, 0, 3, 1, 4)
        attn = self.qk(q, k.transpose(-2, -1)).softmax(-1)
        return self.out_proj(self.av(attn, v).transpose(1, 2).reshape(
            b, n, c))


class Layer(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.ln_1, self.mixer = nn.LayerNorm(dim), Mixer(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.up, self.mlp.down = nn.Linear(dim, 32), nn.Linear(32, dim)

    def forward(self, x):
        x = x + self.mixer(self.ln_1(x))
        return x + self.mlp.down(torch.relu(self.mlp.up(self.ln_2(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.layers = nn.Sequential(Layer(), Layer())

    def forward(self, x):
        return self.layers(self.stem(x))


def test_unknown_builtin_architecture_lists_the_registered():
    with pytest.raises(ValueError, match="pairs.builtin: unknown "
                       "architecture 'resnet'; registered: detr, swin, vit"):
        build_optim_wrapper(Net(), dict(
            type='ColinearityDecayOptimWrapper',
            optimizer=dict(type='SGD', lr=0.1), cd=dict(strength=0.5),
            pairs=dict(builtin=('resnet', ))))


def test_a_quantized_twin_is_found_by_class_and_registered_once():
    from mmdet.models.backbones.swin import WindowMSA

    from mmcd.core.quant import QUANTIZED_MODULES, QuantWindowMSA

    class NamedLikeWindowMSA(nn.Module):  # a name is not a type
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    NamedLikeWindowMSA.__name__ = 'WindowMSA'
    model = nn.Sequential(NamedLikeWindowMSA())
    with pytest.raises(ValueError, match=r'attention module 0 \(WindowMSA\):'
                       r'.*QUANTIZED_MODULES \(registered: Linear, Conv2d, '
                       r'MatMul, FusedRowsLinear, MultiheadAttention, '
                       r'ResidualAdd, WindowMSA'):
        quantize_model(model, QuantConfig(4, 4, 'minmax'))

    class SubclassedWindowMSA(WindowMSA):  # found along the class hierarchy
        pass

    model = nn.Sequential(SubclassedWindowMSA(8, 2, (2, 2)))
    quantize_model(model, QuantConfig(4, 4, 'minmax'))
    assert isinstance(model[0], QuantWindowMSA)
    with pytest.raises(ValueError, match='quantized twin WindowMSA is '
                       'registered already'):
        QUANTIZED_MODULES.register(lambda *args: None, name=WindowMSA)


def test_an_architecture_name_is_registered_once():
    with pytest.raises(ValueError, match="'swin' is registered already"):
        ARCHITECTURES.register(ArchitectureSpec(name='swin', pair_rules=()))


class MHABlock(nn.Module):
    """A Transformer block built on nn.MultiheadAttention (DETR-style)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 32), nn.GELU(),
                                 nn.Linear(32, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ffn(self.norm2(x))


def test_multihead_attention_pairs_address_in_proj_weight():
    """Pairs address parameters: nn.MultiheadAttention's fused
    ``in_proj_weight`` is a pair member (q<->k and v->o per head); it is
    quantized by its twin, whose projections are views of those rows."""
    from mmcd.core.pairs import PairRule, attention_rules, discover_pairs
    torch.manual_seed(0)
    net = nn.Sequential(MHABlock(), MHABlock())
    rules = [PairRule('ffn', r'(?P<block>\d+)\.ffn\.0', '{block}.ffn.2',
                      name='{block}.ffn'),
             *attention_rules('attn', qkv=None, proj='out_proj',
                              qkv_param='in_proj_weight')]
    pairs = discover_pairs(net, rules)
    assert sorted(p.name for p in pairs) == [
        f'{i}.{kind}' for i in (0, 1) for kind in ('ffn', 'qk', 'vo')]
    vo = next(p for p in pairs if p.name == '0.vo')
    w_v, w_o = vo.matrices()
    in_proj, out_proj = net[0].attn.in_proj_weight, net[0].attn.out_proj.weight
    assert torch.equal(w_v[1], in_proj[2 * 16 + 8:].detach())  # head 1 of V
    assert torch.equal(w_o[1], out_proj[:, 8:].detach())
    assert vo.parameters == [in_proj, out_proj]
    # CD through the optim wrapper (update_params, as the Runner calls it)
    # moves the fused matrix beyond what SGD alone does (the lr of the
    # group holding in_proj_weight scales it)

    def trained(strength):
        model = copy.deepcopy(net)
        wrapper = build_optim_wrapper(model, dict(
            type='ColinearityDecayOptimWrapper',
            optimizer=dict(type='SGD', lr=0.1), cd=dict(strength=strength),
            pairs=dict(rules=[dict(kind=r.kind, first=r.first,
                                   second=r.second,
                                   heads_from=r.heads_from, name=r.name,
                                   first_param=r.first_param,
                                   second_param=r.second_param)
                              for r in rules], builtin=())))
        wrapper.bind_model(model)
        torch.manual_seed(1)  # one step: the same gradients in both runs
        wrapper.update_params(model(torch.randn(2, 5, 16)).square().mean())
        return model
    plain, decayed = trained(0.0), trained(0.5)
    assert not torch.equal(plain[0].attn.in_proj_weight,
                           decayed[0].attn.in_proj_weight)
    assert torch.equal(plain[0].norm1.weight, decayed[0].norm1.weight)
    # a rule without the parameter name says which one to give
    with pytest.raises(ValueError, match="no 2-D 'weight'.*first_param="
                       "'in_proj_weight'"):
        discover_pairs(net, attention_rules('attn', qkv=None,
                                            proj='out_proj'))
    quantize_model(net, QuantConfig(4, 4, 'minmax'))
    assert net[0].attn.q_proj.weight.data_ptr() == in_proj.data_ptr()


def test_a_reparameterization_rule_on_a_non_linear_is_named():
    """A rule whose next module is not a Linear (an nn.MultiheadAttention)
    warns instead of skipping silently; the block is still quantized."""
    from mmcd.core.quant import calibrate
    spec = ARCHITECTURES.register(ArchitectureSpec(
        name='test-mha', pair_rules=(),
        reparam_rules=((r'(?P<p>\d+)\.norm1', '{p}.attn'),
                       (r'(?P<p>\d+)\.norm2', '{p}.ffn.0'))))
    try:
        net = nn.Sequential(MHABlock())
        x = torch.randn(2, 5, 16)
        cfg = QuantConfig(8, 8, 'repq-vit', skip=[r'attn$'])
        quantize_model(net, cfg)
        with pytest.warns(UserWarning, match=r"0\.norm1 matches the "
                          r"reparameterization rule .* but 0\.attn is a "
                          r'MultiheadAttention, not an nn\.Linear'):
            summary = calibrate(net, cfg, lambda: net(x))
        assert summary['reparameterized'] == 1  # norm2 -> ffn.0
    finally:
        ARCHITECTURES.unregister(spec.name)


def test_a_skipped_attention_is_left_in_float_without_error():
    """Skipping Swin's inner WindowMSA leaves its ShiftWindowMSA container
    without quantized matmuls: a user's choice, not an error."""
    from mmdet.models.backbones.swin import ShiftWindowMSA

    from mmcd.core.quant import QuantWindowMSA
    net = nn.Sequential(ShiftWindowMSA(8, 2, 2))
    quantize_model(net, QuantConfig(4, 4, 'minmax', skip=[r'w_msa$']))
    assert not isinstance(net[0].w_msa, QuantWindowMSA)
    net = nn.Sequential(ShiftWindowMSA(8, 2, 2))
    quantize_model(net, QuantConfig(4, 4, 'minmax'))
    assert isinstance(net[0].w_msa, QuantWindowMSA)
