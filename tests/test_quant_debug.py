"""Per-layer SQNR report (mmcd.core.quant.debug) against hand computation."""
import math

import pytest
import torch
from torch import nn

from mmcd.core.quant import QuantConfig, calibrate, quantize_model
from mmcd.core.quant.debug import quantization_report, sqnr_db


def db(reference, other):
    reference, other = reference.double(), other.double()
    return 10 * math.log10(float(reference.square().sum()) /
                           float((other - reference).square().sum()))


def test_report_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    reference = [m for m in model]  # float layers, for hand computation
    x = torch.randn(32, 6)
    with torch.no_grad():
        float_hidden = reference[0](x)
        float_out = model(x)
    cfg = QuantConfig(4, 4, 'minmax', first_layer_bits=4)
    quantize_model(model, cfg)
    calibrate(model, cfg, lambda: model(x))
    states = [m.state for m in model.modules() if hasattr(m, 'state')]
    with torch.no_grad():
        report = quantization_report(model, lambda: model(x))
        quant_in = model[0].input_quantizer(x)
        quant_hidden = model[0](x)
        quant_out = model(x)
        quant_in2 = model[2].input_quantizer(torch.relu(quant_hidden))
    assert [m.state for m in model.modules() if hasattr(m, 'state')] == \
        states  # restored
    first, second = report['0'], report['2']
    assert first['input_sqnr']['input_quantizer'] == pytest.approx(
        db(x, quant_in))
    assert first['weight_sqnr'] == pytest.approx(
        db(model[0].weight, model[0].quant_weight))
    assert first['output_sqnr'] == pytest.approx(db(float_hidden,
                                                    quant_hidden))
    # the second layer's input noise is its own quantizer's, on the
    # quantized run's inputs; its output noise is everything accumulated
    assert second['input_sqnr']['input_quantizer'] == pytest.approx(
        db(torch.relu(quant_hidden), quant_in2))
    assert second['output_sqnr'] == pytest.approx(db(float_out, quant_out))
    assert first['bits'] == dict(weight_quantizer=4, input_quantizer=4)


def test_unreached_layers_and_errors():
    model = nn.ModuleDict(dict(used=nn.Linear(4, 4), unused=nn.Linear(4, 4)))
    cfg = QuantConfig(8, 8, 'minmax')
    quantize_model(model, cfg)
    with pytest.raises(ValueError, match='no calibrated quantizer'):
        quantization_report(model, lambda: None)
    x = torch.randn(8, 4)
    calibrate(model, cfg, lambda: model['used'](x))
    report = quantization_report(model, lambda: model['used'](x))
    assert report['unused']['output_sqnr'] is None
    assert report['unused']['input_sqnr'] == {}  # never calibrated
    assert report['used']['output_sqnr'] > 30  # 8 bits


def test_sqnr_db_edges():
    assert sqnr_db(1.0, 0.0) == math.inf
    assert sqnr_db(0.0, 1.0) == -math.inf
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
