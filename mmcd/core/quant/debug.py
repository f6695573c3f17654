"""Float vs quantized, layer by layer: where the quantization noise is made.

:func:`quantization_report` runs a calibrated model twice on the same inputs,
once with every quantizer off (float) and once on, and returns per layer
(:func:`~mmcd.core.quant.convert.layer_quantizers`):

* ``weight_sqnr``: the weight against its quantized copy;
* ``input_sqnr``: each quantizer's input against its own output in the
  quantized run (the noise this quantizer adds, on the inputs it really
  sees: ``input`` for a Linear/Conv2d, ``a`` and ``b`` for a matmul);
* ``output_sqnr``: the layer's output in the quantized run against the same
  layer's output in the float run (the noise accumulated up to and through
  this layer).

SQNR in dB: ``10 log10(sum y^2 / sum (y_q - y)^2)`` over all values (all
calls of the layer in the run); ``inf`` where nothing changed; None for a
layer the run never reached or whose inputs differ in shape between the runs
(run the dense part: backbone, neck, RPN). The float
run's layer outputs are kept on the CPU until the quantized run consumes
them: calibrate-sized inputs, not a whole dataset. Pure PyTorch.
"""
import math
from typing import Callable, Dict, List

import torch
from torch import nn

from .convert import fake_quantizers, layer_quantizers
from .quantizers import FakeQuantizer


def sqnr_db(signal_sq: float, noise_sq: float) -> float:
    """``10 log10(signal / noise)``; ``inf`` for no noise."""
    if noise_sq == 0:
        return math.inf
    if signal_sq == 0:
        return -math.inf
    return 10 * math.log10(signal_sq / noise_sq)


class _Energy:
    """Running ``sum y^2`` and ``sum (y_q - y)^2``; ``db`` is None when
    nothing was compared, or when the two runs gave the layer inputs of
    different shapes (e.g. RoI heads fed different proposals)."""

    def __init__(self):
        self.signal = self.noise = 0.0
        self.calls, self.comparable = 0, True

    def add(self, reference: torch.Tensor, quantized: torch.Tensor):
        self.calls += 1
        if reference.shape != quantized.shape:
            self.comparable = False
            return
        reference, quantized = reference.double(), quantized.double()
        self.signal += float(reference.square().sum())
        self.noise += float((quantized - reference).square().sum())

    @property
    def db(self):
        if not self.calls or not self.comparable:
            return None
        return sqnr_db(self.signal, self.noise)


def _first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def quantization_report(model: nn.Module,
                        run: Callable[[], None]) -> Dict[str, Dict]:
    """Per-layer SQNRs of a calibrated model (module docstring); ``run``
    runs the model on the inputs to compare on. The quantizers' states are
    restored afterwards."""
    layers = layer_quantizers(model)
    calibrated = {id(q) for qs in layers.values() for q in qs
                  if q.calibrated}
    if not calibrated:
        raise ValueError('the model has no calibrated quantizer: calibrate '
                         'it before the report')
    quantizers = fake_quantizers(model)
    states = [q.state for q in quantizers]
    modules = dict(model.named_modules())
    float_outputs: Dict[str, List[torch.Tensor]] = {n: [] for n in layers}
    outputs = {n: _Energy() for n in layers}
    inputs = {(n, attr): _Energy() for n in layers
              for attr, q in modules[n].named_children()
              if isinstance(q, FakeQuantizer) and id(q) in calibrated
              and 'weight' not in attr}

    def record_float(name):
        def hook(module, args, output):
            float_outputs[name].append(_first_tensor(output).detach().cpu())
        return hook

    def compare_output(name):
        def hook(module, args, output):
            output = _first_tensor(output).cpu()
            reference = float_outputs[name].pop(0) if float_outputs[name] \
                else output.new_empty(0)  # called more often than in float
            outputs[name].add(reference, output)
        return hook

    def compare_input(key):
        def hook(module, args, output):
            inputs[key].add(args[0].cpu(), output.cpu())
        return hook

    handles = []
    try:
        for q in quantizers:
            q.state = 'fp'
        handles = [modules[n].register_forward_hook(record_float(n))
                   for n in layers]
        run()
        for handle in handles:
            handle.remove()
        for q in quantizers:
            q.state = 'quant' if id(q) in calibrated else 'fp'
        handles = [modules[n].register_forward_hook(compare_output(n))
                   for n in layers]
        handles += [getattr(modules[n], attr).register_forward_hook(
            compare_input((n, attr))) for n, attr in inputs]
        run()
    finally:
        for handle in handles:
            handle.remove()
        for q, state in zip(quantizers, states):
            q.state = state
    report = {}
    for name, own in layers.items():
        module = modules[name]
        entry = dict(output_sqnr=outputs[name].db,
                     input_sqnr={attr: inputs[(name, attr)].db
                                 for n, attr in inputs if n == name},
                     bits={attr: q.bits for attr, q in
                           module.named_children()
                           if isinstance(q, FakeQuantizer)})
        weight_quantizer = getattr(module, 'weight_quantizer', None)
        if weight_quantizer is not None and weight_quantizer.calibrated:
            energy = _Energy()
            energy.add(module.weight, weight_quantizer(module.weight))
            entry['weight_sqnr'] = energy.db
        report[name] = entry
    return report
