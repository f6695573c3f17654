"""Deployment: ONNX export of a calibrated PTQ model in QDQ form and its
onnxruntime check (needs ``requirements/deploy.txt``: onnx, onnxruntime,
onnxscript). The QDQ rewrite itself is pure PyTorch
(:mod:`mmcd.core.quant.qdq`); this package maps it to ONNX
(onnx_export.py, end2end.py), holds the yardstick of the check
(yardstick.py) and checks a graph against TensorRT's Q/DQ rules
(tensorrt_check.py)."""
from .onnx_export import (INTEGER_KERNELS, MIN_QDQ_OPSET,
                          ORT_SESSION_CONFIG, PROFILE_GRAPH_CHECKS,
                          QDQ_DISABLED_OPTIMIZERS, FeatureExtractor,
                          OnnxFeatures, OnnxPerShape, export_onnx,
                          integer_kernel_counts, interleaved_latency,
                          kernel_times, ort_session, profile_problems)
from .tensorrt_check import tensorrt_problems
from .yardstick import (DRAWS, ComparedFeatures, RoundingDraw, RuntimeDraw,
                        SimulationDraw, SummationDraw,
                        changed_detections, feature_consumer,
                        matched_detections)

__all__ = [
    'MIN_QDQ_OPSET', 'ORT_SESSION_CONFIG', 'QDQ_DISABLED_OPTIMIZERS',
    'DRAWS', 'ComparedFeatures', 'FeatureExtractor',
    'OnnxFeatures', 'OnnxPerShape', 'RoundingDraw', 'RuntimeDraw',
    'SimulationDraw', 'SummationDraw',
    'export_onnx', 'kernel_times', 'INTEGER_KERNELS',
    'integer_kernel_counts', 'interleaved_latency',
    'ort_session', 'changed_detections', 'feature_consumer',
    'matched_detections', 'tensorrt_problems', 'PROFILE_GRAPH_CHECKS',
    'profile_problems'
]
