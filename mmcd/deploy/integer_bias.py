"""The bias of a quantized Linear inside onnxruntime's integer kernel.

onnxruntime 1.32 fuses mmcd's QDQ Linear, ``DequantizeLinear(QuantizeLinear
(x)) @ DequantizeLinear(W) + b``, into ``MatMulIntegerToFloat`` followed by
a float ``Add`` of the bias (measured on Swin-T 512x768 W8A8: the adds took
25.3 of 312.3 ms). It folds the bias into the kernel only from another
form of the same product,

    MatMulInteger(q_x, q_W, z_x, z_W) -> Cast(float) -> Mul(Mul(s_x, s_W))
        -> Add(b)

and only while its ``ConstantFolding`` optimizer is off (on, the constant
``Mul(s_x, s_W)`` is folded first and nothing fuses; checked on a
hand-built graph). :func:`fold_bias_into_integer_matmul` rewrites an
exported file into that form; :func:`~.onnx_export.ort_session` turns
``ConstantFolding`` off for a graph that holds ``MatMulInteger``. The
product is the same integers times the same scales: ``(q_x - z_x)(q_W -
z_W)`` summed in int32, then ``s_x s_W``, then ``b``; only the float
rescaling's order differs from the QDQ form's (tested against it in
onnxruntime).

Rewritten: every ``MatMul`` whose inputs are a per-tensor
``DequantizeLinear`` of 8-bit codes (a ``QuantizeLinear`` output, or a
convolution's im2col patches of them) and a ``DequantizeLinear`` of an
8-bit integer initializer (per output column), whose output feeds one
``Add`` of a constant bias of the output's width. 4-bit containers
(``uint4``/``int4``) are not inputs of ``MatMulInteger`` and stay as they
are; so do matmuls of two activations and Linear layers without a bias
(onnxruntime fuses their QDQ form as it is).
"""
from typing import Dict, List

#: the ONNX element types ``MatMulInteger`` takes
_EIGHT_BIT = (2, 3)  # TensorProto.UINT8, TensorProto.INT8


def _producers(graph) -> Dict[str, object]:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph) -> Dict[str, List[object]]:
    found: Dict[str, List[object]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == 'axis'), 1)


def fold_bias_into_integer_matmul(path: str) -> int:
    """Rewrite the ONNX file at ``path`` in place (module docstring);
    returns the number of Linear layers rewritten."""
    import onnx
    from onnx import TensorProto, helper
    model = onnx.load(path)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer, consumers = _producers(graph), _consumers(graph)
    rewritten = 0
    for matmul in [n for n in graph.node if n.op_type == 'MatMul']:
        dq_x, dq_w = (producer.get(name) for name in matmul.input)
        if not (dq_x and dq_w and dq_x.op_type == 'DequantizeLinear' and
                dq_w.op_type == 'DequantizeLinear'):
            continue
        weight = initializers.get(dq_w.input[0])
        zero_x = initializers.get(dq_x.input[2]) if len(dq_x.input) > 2 \
            else None
        zero_w = initializers.get(dq_w.input[2]) if len(dq_w.input) > 2 \
            else None
        scale_x = initializers.get(dq_x.input[1])
        users = consumers.get(matmul.output[0], [])
        if not (weight is not None and weight.data_type in _EIGHT_BIT
                and zero_x is not None and zero_x.data_type in _EIGHT_BIT
                and zero_w is not None
                and scale_x is not None and not list(scale_x.dims)
                and len(weight.dims) == 2 and _axis(dq_w) in (1, -1)
                and len(users) == 1 and users[0].op_type == 'Add'):
            continue
        add = users[0]
        bias_name = next((n for n in add.input if n != matmul.output[0]),
                         None)
        bias = initializers.get(bias_name)
        if bias is None or list(bias.dims) != [weight.dims[1]]:
            continue
        name = matmul.name or matmul.output[0]
        accumulated, as_float, scale, scaled = (
            f'{name}_int32', f'{name}_float', f'{name}_scale',
            f'{name}_scaled')
        nodes = [
            helper.make_node('MatMulInteger', [dq_x.input[0], weight.name,
                                               zero_x.name, zero_w.name],
                             [accumulated], name=f'{name}_MatMulInteger'),
            helper.make_node('Cast', [accumulated], [as_float],
                             to=TensorProto.FLOAT, name=f'{name}_Cast'),
            helper.make_node('Mul', [scale_x.name, dq_w.input[1]], [scale],
                             name=f'{name}_ScaleProduct'),
            helper.make_node('Mul', [as_float, scale], [scaled],
                             name=f'{name}_Rescale')]
        at = list(graph.node).index(matmul)
        graph.node.remove(matmul)
        for offset, node in enumerate(nodes):
            graph.node.insert(at + offset, node)
        add.input[list(add.input).index(matmul.output[0])] = scaled
        rewritten += 1
    used = {name for node in graph.node for name in node.input} | {
        out.name for out in graph.output}
    for node in [n for n in graph.node if n.op_type == 'DequantizeLinear'
                 and not any(o in used for o in n.output)]:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for initializer in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(initializer)
    onnx.save(model, path)
    return rewritten
