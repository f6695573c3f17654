"""Does an exported QDQ graph satisfy TensorRT's explicit quantization?

TensorRT builds a network whose ``QuantizeLinear`` / ``DequantizeLinear``
nodes follow its rules (developer guide, "Explicit Quantization"), for
INT8:

* the zero point is an ``int8`` tensor of zeros (an absent zero point means
  ``uint8`` in ONNX: refused);
* scales are positive;
* activations (a ``QuantizeLinear``) are quantized per tensor: one scale;
* per-channel scales only on the ``DequantizeLinear`` of a constant weight,
  along its output channels (a ``Conv`` weight ``[out, in, kh, kw]``: axis
  0; a ``MatMul`` weight ``[in, out]``: its last axis).

:func:`tensorrt_problems` lists what breaks them, one line per node; the
export of the ``tensorrt`` profile (:mod:`mmcd.core.quant.profiles`) is
checked with it (registered in
:data:`~.onnx_export.PROFILE_GRAPH_CHECKS`). Building the engine needs
TensorRT and a GPU; this check does not.
"""
from typing import List

from .onnx_export import PROFILE_GRAPH_CHECKS

#: ONNX TensorProto data type of int8
_INT8 = 3


@PROFILE_GRAPH_CHECKS.register(name='tensorrt')
def tensorrt_problems(path: str) -> List[str]:
    """What in the ONNX file ``path`` TensorRT's INT8 Q/DQ rules refuse
    (module docstring); empty when it satisfies them."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(path).graph
    constants = {i.name: i for i in graph.initializer}
    for node in graph.node:  # Constant nodes and Identity of a constant
        if node.op_type == 'Constant':  # (TorchScript's shared initializers)
            value = next((a.t for a in node.attribute if a.name == 'value'),
                         None)
            if value is not None:
                constants[node.output[0]] = value
        elif node.op_type == 'Identity' and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    problems = []
    for node in graph.node:
        if node.op_type not in ('QuantizeLinear', 'DequantizeLinear'):
            continue
        where = f'{node.op_type} {node.name or node.output[0]}'
        if len(node.input) < 3 or node.input[2] not in constants:
            problems.append(f'{where}: no constant zero point (ONNX then '
                            'means uint8)')
            continue
        zero = constants[node.input[2]]
        if zero.data_type != _INT8 or numpy_helper.to_array(zero).any():
            problems.append(f'{where}: zero point must be int8 0, got '
                            f'{onnx.TensorProto.DataType.Name(zero.data_type)}'
                            f' {numpy_helper.to_array(zero).ravel()[:4]}')
        scale = constants.get(node.input[1])
        if scale is None:
            problems.append(f'{where}: the scale is not a constant')
            continue
        scale = numpy_helper.to_array(scale)
        if not (scale > 0).all():
            problems.append(f'{where}: non-positive scale')
        if scale.size == 1:
            continue
        if node.op_type == 'QuantizeLinear' or \
                node.input[0] not in constants:
            problems.append(f'{where}: per-channel scales on an activation '
                            '(TensorRT: one scale per tensor)')
            continue
        weight = constants[node.input[0]]
        axis = next((a.i for a in node.attribute if a.name == 'axis'), 1)
        axis %= len(weight.dims)
        for user in consumers.get(node.output[0], []):
            expected = {'Conv': 0,
                        'MatMul': len(weight.dims) - 1}.get(user.op_type)
            if expected is not None and user.input[1] != node.output[0]:
                expected = None  # not the weight operand
            if expected is None or axis != expected:
                problems.append(
                    f'{where}: per-channel weight scales along axis {axis} '
                    f'into {user.op_type} {user.name} (TensorRT: along the '
                    'output channels of a Conv or MatMul weight)')
    return problems
