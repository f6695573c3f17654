"""End-to-end ONNX export of a whole detector (image in, boxes, scores,
labels and masks out) through mmdeploy, float or in QDQ form, and its
onnxruntime run as an mmdet model.

mmdeploy (the ecosystem's exporter for mmdet 3 / mmcv 2) rewrites the
heads' post-processing into standard ONNX ops (``RoiAlign``, ``TopK``,
``NonMaxSuppression``) during a TorchScript trace. What mmcd adds:

* :func:`~mmcd.compat.mmdeploy_torch.torchscript_export`: mmdeploy 1.3.1 on
  torch >= 2.9;
* TorchScript symbolics of mmcd's two QDQ ops (:func:`register_symbolics`),
  the counterparts of the ``torch.export`` translations of
  :mod:`.onnx_export`: ``mmcd::quantize_dequantize`` -> ``QuantizeLinear``
  (-> ``Clip`` to ``[0, 2^b - 1]`` below 8 bits) -> ``DequantizeLinear``,
  ``mmcd::dequantize`` -> per-axis ``DequantizeLinear`` of the integer
  weight. The TorchScript exporter stops at opset 20, before ONNX's 4-bit
  types (opset 21): every width is carried in ``uint8`` (integer weights
  of 2-8 bits as ``uint8`` initializers, the same integers; activations
  clipped to their ``2^b`` levels), which computes the same model;
* :func:`deploy_config`: mmdeploy's post-processing parameters taken from
  the detector's own ``test_cfg`` (score threshold, NMS IoU, detections
  per image), so that the exported model post-processes as mmdet does;
* ``End2EndDetector`` (:func:`end2end_detector`): one static-shape model
  per padded input shape run by onnxruntime
  (:func:`~.onnx_export.ort_session`'s QDQ session options), or the same
  function in PyTorch (the detector under mmdeploy's rewriters), its
  outputs turned into mmdet's ``DetDataSample`` by mmdeploy's own
  ``End2EndModel`` post-processing (boxes rescaled, masks pasted), then
  boxes clipped to the original image as mmdet clips them.

What still differs from mmdet's PyTorch post-processing, by mmdeploy's
design: proposals and boxes are clipped to the padded input rather than to
each image's own size before RoI pooling (the clip above restores the final
boxes), the RPN's NMS runs over all levels at once (mmdet's per level), and
mask pasting is mmdeploy's. ``tools/deploy/export_onnx.py --scope detector
--eval`` measures what these cost on the float model.
"""
import copy
import os.path as osp
from typing import Dict, List, Tuple

import torch
from torch import nn

from mmcd.compat.mmdeploy_torch import torchscript_export
from .onnx_export import check_onnx, ort_session

#: opsets of the end-to-end export: per-axis DequantizeLinear needs 13, the
#: TorchScript exporter goes up to 20
END2END_MIN_OPSET, END2END_MAX_OPSET = 13, 20
#: its default
END2END_OPSET = 17
#: ONNX TensorProto data type of uint8
_UINT8 = 2
_registered = set()


def _quantize_dequantize_symbolic(g, x, scale, zero_point, bits):
    from torch.onnx import symbolic_helper
    bits = symbolic_helper._get_const(bits, 'i', 'bits')
    zero = g.op('Cast', zero_point, to_i=_UINT8)
    quantized = g.op('QuantizeLinear', x, scale, zero)
    if bits != 8:
        levels = [g.op('Constant', value_t=torch.tensor(v, dtype=torch.uint8))
                  for v in (0, 2**bits - 1)]
        quantized = g.op('Clip', quantized, *levels)
    return g.op('DequantizeLinear', quantized, scale, zero)


def _dequantize_symbolic(g, q, scale, zero_point, bits, axis):
    from torch.onnx import symbolic_helper
    axis = symbolic_helper._get_const(axis, 'i', 'axis')
    return g.op('DequantizeLinear', q, scale,
                g.op('Cast', zero_point, to_i=_UINT8), axis_i=axis)


def _exp2_symbolic(g, x):
    two = g.op('Constant', value_t=torch.tensor(2.0))
    return g.op('Pow', g.op('CastLike', two, x), x)


def register_symbolics(opset: int = END2END_OPSET) -> None:
    """Register the TorchScript symbolics of ``mmcd::quantize_dequantize``
    and ``mmcd::dequantize`` (module docstring) for ``opset``, and of
    ``aten::exp2`` (the log-sqrt2 quantizer's levels, which the TorchScript
    exporter lacks) as ``Pow(2, x)``."""
    if opset in _registered:
        return
    for name, symbolic in (
            ('mmcd::quantize_dequantize', _quantize_dequantize_symbolic),
            ('mmcd::dequantize', _dequantize_symbolic),
            ('aten::exp2', _exp2_symbolic)):
        torch.onnx.register_custom_op_symbolic(name, symbolic, opset)
    _registered.add(opset)


def import_mmdeploy() -> None:
    """Import mmdeploy and register its mmdet rewriters; an ImportError
    that says how to install it when it is missing."""
    try:
        from mmdeploy.codebase import import_codebase
        from mmdeploy.utils import Codebase
    except ImportError:
        raise ImportError('the end-to-end export needs mmdeploy: pip install '
                          '--no-deps -r requirements/mmdeploy.txt') from None
    import_codebase(Codebase.MMDET)


def deploy_config(model_cfg, opset: int = END2END_OPSET):
    """mmdeploy's deploy config for a static-shape onnxruntime export of
    ``model_cfg`` (an mmengine Config with a two-stage detector's
    ``test_cfg``). mmdeploy's RoI-head rewriter reads score threshold, NMS
    IoU and detections per image from ``test_cfg.rcnn``, its RPN rewriter
    reads ``nms_pre``, NMS IoU and proposals from ``test_cfg.rpn`` but its
    score threshold from ``post_processing``: 0 here, as mmdet's RPN keeps
    every score (0.05, mmdeploy's own configs' value, drops proposals
    mmdet keeps)."""
    from mmengine import Config
    test_cfg = model_cfg.model.get('test_cfg') or {}
    rcnn = test_cfg.get('rcnn')
    if rcnn is None:
        raise ValueError(
            f'{model_cfg.model.type}: the end-to-end export covers '
            'two-stage detectors with a test_cfg.rcnn (Mask R-CNN, Cascade '
            'Mask R-CNN); export its backbone + neck with --scope features')
    with_masks = 'mask_head' in (model_cfg.model.get('roi_head') or {})
    return Config(dict(
        onnx_config=dict(
            type='onnx', export_params=True,
            keep_initializers_as_inputs=False, opset_version=opset,
            save_file='end2end.onnx', input_names=['input'],
            output_names=['dets', 'labels'] + (['masks'] if with_masks
                                               else []),
            input_shape=None, optimize=False),
        codebase_config=dict(
            type='mmdet', task='ObjectDetection', model_type='end2end',
            post_processing=dict(
                # the RPN's threshold (mmdet's RPN has none); the RoI head
                # takes its own from test_cfg.rcnn, as the rest below
                score_threshold=0.0, confidence_threshold=0.0,
                iou_threshold=rcnn['nms']['iou_threshold'],
                max_output_boxes_per_class=rcnn['max_per_img'],
                pre_top_k=-1, keep_top_k=rcnn['max_per_img'],
                background_label_id=-1, export_postprocess_mask=False)),
        backend_config=dict(type='onnxruntime')))


def export_detector(detector: nn.Module, inputs: torch.Tensor,
                    data_samples: list, path: str, model_cfg,
                    opset: int = END2END_OPSET) -> str:
    """Export ``detector`` (float, or rewritten by :func:`~mmcd.core.quant.
    qdq.to_qdq`) end to end at the shape of ``inputs`` (one preprocessed
    image ``[1, 3, H, W]`` and its ``data_samples``) to ``path``."""
    import_mmdeploy()
    from mmdeploy.apis.onnx import export
    if inputs.shape[0] != 1:
        raise ValueError(f'export one image at a time, got a batch of '
                         f'{inputs.shape[0]}')
    register_symbolics(opset)
    cfg = deploy_config(model_cfg, opset)
    prefix, ext = osp.splitext(path)
    if ext != '.onnx':
        raise ValueError(f'{path}: the export path must end in .onnx')
    detector = copy.deepcopy(detector).eval()
    with torchscript_export(), torch.no_grad():
        export(detector, inputs,
               input_metas=dict(data_samples=data_samples, mode='predict'),
               output_path_prefix=prefix, backend='onnxruntime',
               input_names=cfg.onnx_config.input_names,
               output_names=cfg.onnx_config.output_names,
               context_info=dict(deploy_cfg=cfg), opset_version=opset,
               dynamic_axes=None, verbose=False,
               keep_initializers_as_inputs=False, optimize=False)
    check_onnx(path)
    return path


def _end2end_class():
    import_mmdeploy()
    from mmdeploy.codebase.mmdet.deploy.object_detection_model import \
        End2EndModel
    from mmdeploy.core import RewriterContext

    class End2EndDetector(End2EndModel):
        """``detector`` as its end-to-end export computes it, called like an
        mmdet model (``test_step``): ``runtime='onnxruntime'`` runs one
        static-shape export per padded input shape (``{prefix}_{H}x{W}.onnx``
        in ``out_dir``, exported on first use); ``runtime='pytorch'`` runs
        ``detector`` eagerly under mmdeploy's rewriters, the same function
        in PyTorch's arithmetic (the reference the onnxruntime model is
        compared with, and what the yardstick's draws perturb). Outputs go
        through mmdeploy's post-processing, then boxes are clipped to the
        original image (:func:`clip_to_image`)."""

        def __init__(self, detector: nn.Module, model_cfg,
                     runtime: str = 'onnxruntime', out_dir: str = '',
                     prefix: str = '', opset: int = END2END_OPSET):
            if runtime not in ('onnxruntime', 'pytorch'):
                raise ValueError(f'runtime must be onnxruntime or pytorch, '
                                 f'got {runtime!r}')
            if runtime == 'onnxruntime' and not (out_dir and prefix):
                raise ValueError('the onnxruntime runtime needs out_dir and '
                                 'prefix (where the exports go)')
            self.__dict__['_detector'] = detector  # not a submodule
            self.runtime, self.out_dir, self.prefix = runtime, out_dir, prefix
            self.opset = opset
            self.sessions: Dict[Tuple[int, ...], object] = {}
            super().__init__('onnxruntime', [], 'cpu',
                             deploy_config(model_cfg, opset),
                             model_cfg=model_cfg,
                             data_preprocessor=detector.data_preprocessor)

        def _init_wrapper(self, backend, backend_files, device):
            """No backend wrapper: :meth:`outputs` runs the model."""

        def path_for(self, inputs: torch.Tensor) -> str:
            return osp.join(self.out_dir, f'{self.prefix}_{inputs.shape[-2]}x'
                            f'{inputs.shape[-1]}.onnx')

        @torch.no_grad()
        def outputs(self, image: torch.Tensor, sample) -> List[torch.Tensor]:
            """The exported graph's outputs (``dets``, ``labels``[,
            ``masks``]) for one preprocessed image ``[1, 3, H, W]``."""
            if self.runtime == 'pytorch':
                self._detector.eval()
                with RewriterContext(cfg=self.deploy_cfg,
                                     backend='onnxruntime'):
                    return list(self._detector(image, [copy.deepcopy(sample)],
                                               mode='predict'))
            key = tuple(image.shape)
            if key not in self.sessions:
                path = export_detector(self._detector, image,
                                       [copy.deepcopy(sample)],
                                       self.path_for(image), self.model_cfg,
                                       self.opset)
                self.sessions[key] = ort_session(path)
            found = self.sessions[key].run(None, {'input': image.numpy()})
            return [torch.from_numpy(f) for f in found]

        def forward(self, inputs: torch.Tensor, data_samples: List,
                    mode: str = 'predict', **kwargs):
            for image, sample in zip(inputs, data_samples):
                found = self.outputs(image[None].contiguous(), sample)
                self.postprocessing_results(
                    found[0], found[1], found[2] if len(found) > 2 else None,
                    [sample])
                clip_to_image(sample)
            return data_samples

    return End2EndDetector


def clip_to_image(sample) -> None:
    """Clip ``sample.pred_instances.bboxes`` to ``sample.ori_shape`` in
    place, as mmdet's box decoding clips them (to the resized image, then
    rescaled)."""
    height, width = sample.ori_shape[:2]
    boxes = sample.pred_instances.bboxes
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)


def end2end_detector(detector: nn.Module, model_cfg, **kwargs) -> nn.Module:
    """An ``End2EndDetector`` of ``detector`` (``runtime``, ``out_dir``,
    ``prefix``, ``opset`` as keywords). The class derives from mmdeploy's
    ``End2EndModel`` and mmdeploy is optional, so it is defined on first
    use."""
    return _end2end_class()(detector, model_cfg, **kwargs)
