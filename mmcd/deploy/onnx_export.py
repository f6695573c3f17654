"""ONNX export of backbone + neck, float or QDQ, and onnxruntime inference.

:func:`export_onnx` exports with ``torch.onnx.export(..., dynamo=True)`` and
translates mmcd's two quantization ops (:mod:`mmcd.core.quant.qdq`):

* ``mmcd::quantize_dequantize(x, s, z, bits, signed)`` -> ``QuantizeLinear``
  -> ``DequantizeLinear`` with a ``uint4`` (4 bits) or ``uint8`` zero point
  (``int4`` / ``int8`` when ``signed``: the symmetric grids of the
  ``tensorrt`` profile, zero point 0); other widths (2, 3, 5-7 bits) use
  the 8-bit type and a ``Clip`` to the ``2^b`` levels between the two,
  since ``QuantizeLinear`` saturates to its type's range while mmcd's
  quantizer clamps to its own;
* ``mmcd::quantize(x, s, z, bits, signed)`` -> ``QuantizeLinear`` to
  ``uint8`` (``int8``), with the ``Clip`` below 8 bits: the codes of a
  convolution's input, which its im2col form rearranges (``QDQConv2d``);
* ``mmcd::dequantize(q, s, z, bits, axis, signed)`` ->
  ``DequantizeLinear(axis)`` of the integer weight, stored as a ``uint4``
  (up to 4 bits) or ``uint8`` initializer (``int4`` / ``int8`` when
  ``signed``; :func:`store_integer_initializers` folds the casts of
  constants; ``DequantizeLinear`` is left unfolded).

4-bit types need opset 21 (:data:`MIN_QDQ_OPSET`, also the floor for the
quantized export). Both ops round half to even, as ``torch.round`` does.
"""
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from mmcd.core.quant.qdq import (ActivationQDQ, IntegerWeightMixin,
                                 integer_levels)
from mmcd.core.registry import Registry

#: opset of the 4-bit integer types (and the floor of mmcd's QDQ export)
MIN_QDQ_OPSET = 21
#: onnxruntime optimizers to turn off for a QDQ model: MatMulAddFusion
#: turns a Linear's MatMul + bias Add into a float Gemm before the QDQ
#: fusion runs, so the Linear would keep dequantized float weights; without
#: it DequantizeLinear -> MatMul (+ Add) becomes MatMulIntegerToFloat
#: (measured: all 33 Linear layers and attention matmuls of the toy fused
#: into integer kernels, against 13 with it on)
QDQ_DISABLED_OPTIMIZERS = ('MatMulAddFusion', )
#: session options of :func:`ort_session`. A Linear whose input is not a
#: QuantizeLinear/DequantizeLinear pair next to it (RepQ-ViT's shift ``t``
#: sits between: ``DequantizeLinear -> Sub -> MatMul``) has its
#: ``DequantizeLinear(W) -> MatMul`` fused into ``MatMulNBits``, which by
#: default (accuracy level 4) quantizes its float input to int8 on the fly:
#: a quantization the model does not contain. Measured on the toy W8A8
#: RepQ-ViT backbone: 7.6% of the first block's query values on another
#: grid point than the simulation's (0.01% with level 1), feature deviation
#: mean 0.30 -> 0.20 steps; a lone Linear 1.1e-2 -> float rounding. Level 1
#: computes in float32 from the integer weights.
ORT_SESSION_CONFIG = {'session.qdq_matmulnbits_accuracy_level': '1'}
#: checks of an exported file against a deployment profile's runtime, by
#: profile name: ``check(path) -> [problem, ...]`` (tensorrt_check.py)
PROFILE_GRAPH_CHECKS = Registry('graph check of a deployment profile')


def profile_problems(path: str, profile: str) -> List[str]:
    """What in the exported ``path`` the runtime of ``profile`` refuses
    (its registered graph check; none registered: nothing to check)."""
    if profile not in PROFILE_GRAPH_CHECKS:
        return []
    return PROFILE_GRAPH_CHECKS.get(profile)(path)


def _codes_onnx(x, scale, zero, bits: int, signed: bool, qtype):
    """``QuantizeLinear`` to ``qtype``, clipped to the ``bits``-wide grid
    where the type is wider."""
    from onnxscript import opset21 as op
    quantized = op.QuantizeLinear(x, scale, zero)
    if bits not in (4, 8) or (bits == 4 and qtype.bitwidth == 8):
        lo, hi = integer_levels(bits, signed)
        quantized = op.Clip(
            quantized, op.Cast(op.Constant(value_int=lo), to=qtype),
            op.Cast(op.Constant(value_int=hi), to=qtype))
    return quantized


def _qdq_onnx(x, scale, zero_point, bits: int, signed: bool):
    from onnxscript import ir
    from onnxscript import opset21 as op
    qtype = _integer_type(ir, bits == 4, signed)
    zero = op.Cast(zero_point, to=qtype)
    return op.DequantizeLinear(
        _codes_onnx(x, scale, zero, bits, signed, qtype), scale, zero)


def _quantize_onnx(x, scale, zero_point, bits: int, signed: bool):
    from onnxscript import ir
    from onnxscript import opset21 as op
    qtype = _integer_type(ir, False, signed)  # the 8-bit container
    return _codes_onnx(x, scale, op.Cast(zero_point, to=qtype), bits,
                       signed, qtype)


def _dequantize_onnx(q, scale, zero_point, bits: int, axis: int,
                     signed: bool):
    from onnxscript import ir
    from onnxscript import opset21 as op
    qtype = _integer_type(ir, bits <= 4, signed)
    if bits <= 4:
        q = op.Cast(q, to=qtype)
    return op.DequantizeLinear(q, scale, op.Cast(zero_point, to=qtype),
                               axis=axis)


def _integer_type(ir, four_bit: bool, signed: bool):
    if four_bit:
        return ir.DataType.INT4 if signed else ir.DataType.UINT4
    return ir.DataType.INT8 if signed else ir.DataType.UINT8


class FeatureExtractor(nn.Module):
    """A detector's backbone + neck (``extract_feat``) as a module that maps
    images ``[N, 3, H, W]`` (after the data preprocessor) to its feature
    maps, the part that is exported."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor):
        return tuple(self.detector.extract_feat(images))


def export_onnx(module: nn.Module, images: torch.Tensor, path: str,
                opset: int = MIN_QDQ_OPSET) -> str:
    """Export ``module(images)`` to ``path`` (static shapes: the shape of
    ``images``). A model holding QDQ modules (:func:`~mmcd.core.quant.qdq.
    to_qdq`) needs ``opset >= 21``; an error says so."""
    quantized = any(isinstance(m, (ActivationQDQ, IntegerWeightMixin))
                    for m in module.modules())
    if quantized and opset < MIN_QDQ_OPSET:
        raise ValueError(
            f'a QDQ export needs ONNX opset >= {MIN_QDQ_OPSET} (its 4-bit '
            f'integer types and QuantizeLinear/DequantizeLinear forms); got '
            f'opset {opset}: pass --opset {MIN_QDQ_OPSET}')
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ImportError('ONNX export needs onnx, onnxruntime and '
                          'onnxscript: pip install -r '
                          'requirements/deploy.txt') from None
    module = module.eval()
    with torch.no_grad():
        program = torch.onnx.export(
            module, (images, ), dynamo=True, opset_version=opset,
            optimize=True, verbose=False, custom_translation_table={
                torch.ops.mmcd.quantize_dequantize.default: _qdq_onnx,
                torch.ops.mmcd.quantize.default: _quantize_onnx,
                torch.ops.mmcd.dequantize.default: _dequantize_onnx})
    program.save(path)
    if quantized:
        store_integer_initializers(path)
    fold_biases(module, path)
    check_onnx(path)
    return path


def fold_biases(module: nn.Module, path: str) -> int:
    """:func:`~.integer_bias.fold_bias_into_integer_matmul` on the export
    ``path`` of ``module`` when its integer layers ask for it (the
    profile's ``bias_in_integer_kernel``); the layers rewritten."""
    if not any(getattr(m, 'bias_in_kernel', False)
               for m in module.modules()):
        return 0
    from .integer_bias import fold_bias_into_integer_matmul
    return fold_bias_into_integer_matmul(path)


def check_onnx(path: str) -> None:
    """``onnx.checker`` with ``full_check`` (strict shape inference) on
    the written file: an export that is not valid ONNX stops here."""
    import onnx
    onnx.checker.check_model(path, full_check=True)


def store_integer_initializers(path: str) -> None:
    """Replace every ``Cast`` of an initializer to an integer type by an
    initializer of that type (the exporter's optimizer folds only small
    ones): the integer weights and zero points are stored as ``uint4`` /
    ``uint8`` (``int4``/``int8``) tensors, 4-bit ones packed two per byte."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, numpy_helper
    types = {TensorProto.UINT4: ml_dtypes.uint4, TensorProto.INT4:
             ml_dtypes.int4, TensorProto.UINT8: np.uint8,
             TensorProto.INT8: np.int8}
    model = onnx.load(path)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    for node in list(graph.node):
        to = next((a.i for a in node.attribute if a.name == 'to'), None)
        if node.op_type != 'Cast' or node.input[0] not in initializers or \
                to not in types:
            continue
        values = numpy_helper.to_array(initializers[node.input[0]])
        graph.initializer.append(numpy_helper.from_array(
            values.astype(np.int64).astype(types[to]), node.output[0]))
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for initializer in list(graph.initializer):
        if initializer.name not in used:
            graph.initializer.remove(initializer)
    onnx.save(model, path)


def disabled_optimizers_for(path: str) -> Tuple[str, ...]:
    """The onnxruntime optimizers to turn off for the ONNX graph at
    ``path``: none for a float graph; :data:`QDQ_DISABLED_OPTIMIZERS` for
    one with ``QuantizeLinear`` / ``DequantizeLinear`` nodes, and
    ``ConstantFolding`` too where it holds ``MatMulInteger`` (folding the
    scale product first stops the bias fusion: integer_bias.py)."""
    import onnx
    ops = {node.op_type for node in
           onnx.load(path, load_external_data=False).graph.node}
    if not ops & {'QuantizeLinear', 'DequantizeLinear'}:
        return ()
    return QDQ_DISABLED_OPTIMIZERS + (
        ('ConstantFolding', ) if 'MatMulInteger' in ops else ())


def ort_session(path: str, threads: int = 0,
                optimized_path: Optional[str] = None,
                disabled_optimizers: Optional[Sequence[str]] = None,
                profile_prefix: Optional[str] = None):
    """An onnxruntime CPU session with every graph optimization except
    ``disabled_optimizers`` (None: :func:`disabled_optimizers_for` the
    graph), and
    :data:`ORT_SESSION_CONFIG`; ``profile_prefix``: onnxruntime's profiler
    on, its trace written to ``{prefix}_<date>.json`` at
    ``session.end_profiling()`` (:func:`kernel_times`)."""
    import onnxruntime as ort
    if disabled_optimizers is None:
        disabled_optimizers = disabled_optimizers_for(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in ORT_SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(
        path, options, providers=['CPUExecutionProvider'],
        disabled_optimizers=list(disabled_optimizers))


def kernel_times(trace_path: str) -> Dict[str, float]:
    """Seconds spent per operator type in an onnxruntime profiler trace
    (:func:`ort_session` with ``profile_prefix``): the ``Node`` events'
    kernel durations, summed over the runs the trace holds."""
    import json
    with open(trace_path) as f:
        events = json.load(f)
    totals: Dict[str, float] = {}
    for event in events:
        if event.get('cat') == 'Node' and \
                event.get('name', '').endswith('_kernel_time'):
            op = event['args']['op_name']
            totals[op] = totals.get(op, 0.0) + event['dur'] * 1e-6
    return totals


#: onnxruntime's integer kernels: what its graph optimizations fuse a QDQ
#: pattern into (the rest of a QDQ model runs in float)
INTEGER_KERNELS = ('QLinearConv', 'QLinearMatMul', 'MatMulIntegerToFloat',
                   'ConvInteger', 'MatMulInteger', 'QGemm', 'QAttention',
                   'MatMulNBits', 'DynamicQuantizeMatMul')


def integer_kernel_counts(optimized_path: str) -> Dict[str, int]:
    """How many nodes of each of :data:`INTEGER_KERNELS`, and of
    ``QuantizeLinear`` / ``DequantizeLinear`` (the round trips left), an
    optimized model (a session's ``optimized_path``) holds."""
    import onnx
    counts: Dict[str, int] = {}
    for node in onnx.load(optimized_path).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {op: counts[op] for op in INTEGER_KERNELS + (
        'QuantizeLinear', 'DequantizeLinear') if counts.get(op)}


def interleaved_latency(sessions: Dict[str, object], feed: Dict,
                        runs: int, warmup: int = 2) -> Dict[str, float]:
    """Median seconds per ``session.run(None, feed)`` of each session,
    the sessions run in turn ``runs`` times after ``warmup`` rounds (so
    that a slow phase of the machine hits every model alike)."""
    import statistics
    import time
    times: Dict[str, List[float]] = {key: [] for key in sessions}
    for round_ in range(warmup + runs):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            if round_ >= warmup:
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(found) for key, found in times.items()}


class OnnxFeatures:
    """An exported feature extractor run by onnxruntime (CPU,
    :func:`ort_session`), called like the module: ``images -> [features]``
    as torch tensors."""

    def __init__(self, path: str, threads: int = 0):
        self.session = ort_session(path, threads)
        self.input = self.session.get_inputs()[0]

    @property
    def input_shape(self) -> Sequence[int]:
        return self.input.shape

    def __call__(self, images: torch.Tensor) -> List[torch.Tensor]:
        if list(images.shape) != list(self.input_shape):
            raise ValueError(
                f'the ONNX model was exported for input shape '
                f'{list(self.input_shape)}, got {list(images.shape)}: export '
                'at the shape the data pipeline produces')
        outputs = self.session.run(None, {
            self.input.name: images.detach().cpu().numpy().astype(
                np.float32)})
        return [torch.from_numpy(o) for o in outputs]


class OnnxPerShape:
    """``module`` exported once per input shape (static-shape ONNX files
    ``{prefix}_{H}x{W}.onnx`` in ``out_dir``, each on first use) and run by
    onnxruntime: an evaluation over images of several padded shapes (the
    test pipeline keeps aspect ratios) feeds each its model."""

    def __init__(self, module: nn.Module, out_dir: str, prefix: str,
                 opset: int = MIN_QDQ_OPSET):
        self.module, self.out_dir, self.prefix = module, out_dir, prefix
        self.opset = opset
        self.sessions: Dict[Tuple[int, ...], OnnxFeatures] = {}

    def path_for(self, images: torch.Tensor) -> str:
        return osp.join(self.out_dir, f'{self.prefix}_{images.shape[-2]}x'
                        f'{images.shape[-1]}.onnx')

    def __call__(self, images: torch.Tensor) -> List[torch.Tensor]:
        key = tuple(images.shape)
        if key not in self.sessions:
            path = export_onnx(self.module, images, self.path_for(images),
                               self.opset)
            self.sessions[key] = OnnxFeatures(path)
        return self.sessions[key](images)
