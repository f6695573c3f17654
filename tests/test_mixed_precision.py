"""Mixed precision by config: QuantConfig.layer_bits / PostTrainingQuantHook
(layer_bits=...) / tools/test.py --layer-bits."""
import pytest
import torch
from torch import nn

from mmcd.core.quant import (QuantConfig, format_precision_plan,
                             precision_plan, quantize_model)
from mmcd.engine.hooks import PostTrainingQuantHook
from mmcd.utils.runner_setup import UserError, parse_layer_bits
from test_tools_cli import (TOY_CONFIG, assert_one_line_error,
                            run_here)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)


def bits(layer):
    return layer.weight_quantizer.bits, layer.input_quantizer.bits


def test_first_matching_rule_sets_the_bits():
    model = nn.Sequential(Block(), Block())
    quantize_model(model, QuantConfig(4, 4, 'minmax', layer_bits=[
        dict(pattern=r'^1\.fc2$', w_bits=8, a_bits=8),
        dict(pattern=r'^1\.', a_bits=6),  # fc2 already taken by rule 1
        dict(pattern=r'fc1', w_bits=3)]))
    assert bits(model[0].fc1) == (3, 4)
    assert bits(model[0].fc2) == (4, 4)
    assert bits(model[1].fc1) == (4, 6)  # rule 2 before rule 3
    assert bits(model[1].fc2) == (8, 8)


def test_rule_a_bits_override_the_first_layer_bits():
    model = nn.Sequential(Block())
    cfg = dict(first_layer_pattern=r'fc1$', first_layer_bits=8)
    quantize_model(model, QuantConfig(4, 4, 'minmax', **cfg))
    assert bits(model[0].fc1) == (4, 8)
    model = nn.Sequential(Block())
    quantize_model(model, QuantConfig(4, 4, 'minmax', **cfg, layer_bits=[
        dict(pattern='fc1', a_bits=5)]))
    assert bits(model[0].fc1) == (4, 5)


def test_precision_plan_says_what_conversion_did_and_why():
    model = nn.Sequential(Block(), Block(), nn.ConvTranspose2d(2, 2, 2))
    cfg = QuantConfig(4, 4, 'minmax', skip=[r'^1\.fc1$'],
                      first_layer_pattern=r'^0\.fc1$', layer_bits=[
                          dict(pattern=r'^1\.fc2$', w_bits=8, a_bits=6)])
    quantize_model(model, cfg)
    plan = {row['name']: (row['quantized'], row['w_bits'], row['a_bits'],
                          row['why']) for row in precision_plan(model, cfg)}
    assert plan == {
        '0.fc1': (True, 4, 8, 'first layer'),
        '0.fc2': (True, 4, 4, 'default'),
        '1.fc1': (False, None, None, r"skip '^1\.fc1$'"),
        '1.fc2': (True, 8, 6, r"layer_bits '^1\.fc2$'"),
        '2': (False, None, None, 'not quantized (ConvTranspose2d)')}
    table = format_precision_plan(precision_plan(model, cfg)).splitlines()
    assert table[0] == '3 quantized layer(s), 2 weighted layer(s) in float'
    assert table[2].split() == ['1', '4', '8', 'QuantLinear', 'first',
                                'layer', '0.fc1']
    assert table[-1].split() == ['1', 'float', 'float', 'ConvTranspose2d',
                                 'not', 'quantized', '(ConvTranspose2d)', '2']


@pytest.mark.parametrize('rules, message', [
    ([dict(pattern='fc3', w_bits=8)], "['fc3'] match no quantized layer"),
    ([dict(pattern='fc1', w_bits=9)], 'w_bits: bits must be an integer in'),
    ([dict(pattern='fc1', a_bits=1)], 'a_bits: bits must be an integer in'),
    ([dict(pattern='fc1')], 'sets neither w_bits nor a_bits'),
    ([dict(pattern='fc(', w_bits=8)], 'not a regular expression'),
    ([dict(regex='fc1', w_bits=8)], 'dict(pattern=REGEX'),
])
def test_bad_rules(rules, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(
            '[', r'\[').replace(']', r'\]')):
        quantize_model(nn.Sequential(Block()),
                       QuantConfig(4, 4, 'minmax', layer_bits=rules))


def test_skipped_layers_do_not_count_as_matched():
    with pytest.raises(ValueError, match='match no quantized layer'):
        quantize_model(nn.Sequential(Block()), QuantConfig(
            4, 4, 'minmax', skip=['fc2'],
            layer_bits=[dict(pattern='fc2', w_bits=8)]))


def test_hook_and_command_line_spelling():
    hook = PostTrainingQuantHook(layer_bits=[dict(pattern='x', w_bits=8)])
    assert hook.quant_cfg.layer_bits[0].w_bits == 8
    with pytest.raises(ValueError, match='bits must be'):
        PostTrainingQuantHook(layer_bits=[dict(pattern='x', w_bits=12)])
    assert parse_layer_bits([r'stages\.3=w8a8', 'patch=a8', 'x=w6']) == [
        dict(pattern=r'stages\.3', w_bits=8, a_bits=8),
        dict(pattern='patch', a_bits=8), dict(pattern='x', w_bits=6)]
    for bad in ('w8a8', 'stages=', 'x=q8'):
        with pytest.raises(UserError, match='REGEX=wNaM'):
            parse_layer_bits([bad])


def test_cli_layer_bits_errors(tmp_path):
    ckpt = tmp_path / 'model.pth'
    torch.save({}, ckpt)
    code, out = run_here('tools/test.py', TOY_CONFIG, str(ckpt),
                         '--layer-bits', 'fc=w8a8')
    assert_one_line_error(code, out, '--layer-bits needs --quant')
    code, out = run_here('tools/test.py', TOY_CONFIG, str(ckpt), '--quant',
                         'w4a4', '--layer-bits', 'fc=w9a8')
    assert_one_line_error(code, out, '--quant', '2..8')
