"""The PTQ tools a user would pick instead of mmcd, applied to an exported
float ONNX model, for side-by-side measurements
(``tools/benchmarks/compare_ptq_tools.py``, ``ort_latency.py --ort-static``):

* onnxruntime's ``quantize_static`` (:func:`ort_quantized`): the float file
  through its ``quant_pre_process`` (shape inference, graph optimization),
  then QDQ format, ``uint8`` activations, per-channel ``int8`` weights, its
  default operator set (it also quantizes outputs, LayerNorm, Softmax,
  MaxPool, ... and rounds biases to int32), calibrated by one of
  :data:`ORT_METHODS`;
* NVIDIA ModelOpt's ONNX PTQ (:func:`modelopt_quantized`,
  ``modelopt.onnx.quantization.quantize``): ``int8`` mode, calibration on
  the CPU, float32 kept as the high precision, one of
  :data:`MODELOPT_METHODS`.

Both take the calibration images as mmcd calibrates on them (``[N, 3, H,
W]``, after the data preprocessor). 8 bits only: onnxruntime 1.32's
``quantize_static`` with 4-bit types writes a graph onnxruntime refuses (a
``uint4`` MaxPool input, also with ``op_types_to_quantize`` limited to
Conv/MatMul/Gemm: measured on the toy backbone + neck), and ModelOpt's
4-bit modes quantize weights only.
"""
import os.path as osp

import torch

ORT_METHODS = ('MinMax', 'Percentile', 'Entropy')
MODELOPT_METHODS = ('max', 'entropy')


def input_name(path: str) -> str:
    """The name of an ONNX model's first input."""
    import onnx
    return onnx.load(path, load_external_data=False).graph.input[0].name


class ImagesReader:
    """onnxruntime's ``CalibrationDataReader`` protocol: one image per call
    of ``get_next``, then None."""

    def __init__(self, name: str, images: torch.Tensor):
        self.feeds = iter([{name: image[None].numpy()} for image in images])

    def get_next(self):
        return next(self.feeds, None)


def _stem(path: str) -> str:
    return osp.splitext(path)[0]


def ort_quantized(float_path: str, images: torch.Tensor,
                  calibration: str, symbolic_shapes: bool = True) -> str:
    """``float_path`` quantized by onnxruntime's ``quantize_static``
    (module docstring) calibrated with ``calibration`` on ``images``;
    written beside it as ``{stem}_ort_{calibration}.onnx``.
    ``symbolic_shapes``: ``quant_pre_process``'s symbolic shape inference
    (an end-to-end detector's graph defeats it, "Incomplete symbolic shape
    inference" on mmdeploy's Mask R-CNN: False skips it)."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    if calibration not in ORT_METHODS:
        raise ValueError(f'onnxruntime calibration {calibration!r}: choose '
                         f'one of {", ".join(ORT_METHODS)}')
    prepared = f'{_stem(float_path)}_ort_prepared.onnx'
    quant_pre_process(float_path, prepared,
                      skip_symbolic_shape=not symbolic_shapes)
    path = f'{_stem(float_path)}_ort_{calibration.lower()}.onnx'
    quantize_static(prepared, path,
                    ImagesReader(input_name(float_path), images),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod[calibration])
    return path


def modelopt_quantized(float_path: str, images: torch.Tensor,
                       calibration: str) -> str:
    """``float_path`` quantized by ModelOpt's ONNX PTQ (module docstring)
    calibrated with ``calibration`` on ``images``; written beside it as
    ``{stem}_modelopt_{calibration}.onnx``. Needs ``nvidia-modelopt``
    (docs/en/deployment.md says how to install it next to mmcd)."""
    from modelopt.onnx.quantization import quantize
    if calibration not in MODELOPT_METHODS:
        raise ValueError(f'ModelOpt calibration {calibration!r}: choose one '
                         f'of {", ".join(MODELOPT_METHODS)}')
    path = f'{_stem(float_path)}_modelopt_{calibration}.onnx'
    quantize(float_path, quantize_mode='int8',
             calibration_data={input_name(float_path): images.numpy()},
             calibration_method=calibration, calibration_eps=['cpu'],
             high_precision_dtype='fp32', output_path=path)
    return path
