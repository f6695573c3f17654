"""Architecture specs: a new backbone family is one registered spec, read by
pair discovery (CD), RepQ-ViT's reparameterization, the first-layer rule and
the optim wrapper; conflicting specs fail at conversion time."""
import pytest
import torch
from mmengine.optim import build_optim_wrapper
from torch import nn

from mmcd.core import ARCHITECTURES, ArchitectureSpec, register_architecture
from mmcd.core.pairs import PairRule, attention_rules
from mmcd.core.quant import MatMul, QuantConfig, calibrate, quantize_model


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


@pytest.fixture
def mixer_spec():
    spec = register_architecture(ArchitectureSpec(
        name='test-mixer',
        pair_rules=(PairRule('ffn', r'(?P<block>.+)\.mlp\.up',
                             '{block}.mlp.down', name='{block}.ffn'),
                    *attention_rules('mixer', qkv='in_proj',
                                     proj='out_proj')),
        reparam_rules=((r'(?P<p>.+)\.ln_1', '{p}.mixer.in_proj'),
                       (r'(?P<p>.+)\.ln_2', '{p}.mlp.up')),
        first_layer=r'stem'))
    yield spec
    ARCHITECTURES.pop(spec.name)


def test_a_new_backbone_is_one_spec(mixer_spec):
    torch.manual_seed(0)
    net = Net()
    wrapper = build_optim_wrapper(net, dict(
        type='ColinearityDecayOptimWrapper',
        optimizer=dict(type='SGD', lr=0.1), cd=dict(strength=0.5)))
    wrapper.bind_model(net)
    assert sorted(p.name for p in wrapper.matrix_pairs) == [
        f'layers.{i}.{kind}' for i in (0, 1) for kind in ('ffn', 'qk', 'vo')]
    x = torch.randn(2, 10, 8)
    cfg = QuantConfig(8, 8, 'repq-vit')
    quantized = quantize_model(net, cfg)
    assert quantized.stem.input_quantizer.bits == 8  # the spec's first layer
    assert quantized.layers[0].mlp.up.input_quantizer.bits == 8
    summary = calibrate(quantized, cfg, lambda: quantized(x))
    assert summary['reparameterized'] == 4  # ln_1 and ln_2 of two layers


def test_unknown_builtin_architecture_lists_the_registered():
    with pytest.raises(ValueError, match=r"pairs.builtin: unknown "
                       r"architecture\(s\) \['resnet'\]; registered: swin, "
                       'vit'):
        build_optim_wrapper(Net(), dict(
            type='ColinearityDecayOptimWrapper',
            optimizer=dict(type='SGD', lr=0.1), cd=dict(strength=0.5),
            pairs=dict(builtin=('resnet', ))))


class WindowMSA(nn.Module):
    """A class name the Swin spec claims."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_two_specs_claiming_one_attention_class_fail_at_conversion():
    spec = register_architecture(ArchitectureSpec(
        name='test-claims-window-msa', pair_rules=(),
        quant_attentions={'WindowMSA': lambda module, bits, method: module}))
    try:
        model = nn.Sequential(WindowMSA())
        with pytest.raises(ValueError, match=r'0 \(WindowMSA\) is claimed by '
                           'the architecture specs swin, '
                           'test-claims-window-msa: keep one'):
            quantize_model(model, QuantConfig(4, 4, 'minmax'))
    finally:
        ARCHITECTURES.pop(spec.name)
    with pytest.raises(ValueError, match="'swin' is registered already"):
        register_architecture(ArchitectureSpec(name='swin', pair_rules=()))
