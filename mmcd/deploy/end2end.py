"""End-to-end ONNX export of a whole detector (image in, boxes, scores,
labels and masks out) through mmdeploy, float or in QDQ form, and its
onnxruntime run as an mmdet model.

mmdeploy (the ecosystem's exporter for mmdet 3 / mmcv 2) rewrites the
heads' post-processing into standard ONNX ops (``RoiAlign``, ``TopK``,
``NonMaxSuppression``) during a TorchScript trace. What mmcd adds:

* :func:`~mmcd.compat.mmdeploy_torch.torchscript_export`: mmdeploy 1.3.1 on
  torch >= 2.9;
* TorchScript symbolics of mmcd's three QDQ ops (:func:`register_symbolics`),
  the counterparts of the ``torch.export`` translations of
  :mod:`.onnx_export`: ``mmcd::quantize_dequantize`` -> ``QuantizeLinear``
  (-> ``Clip`` to the ``2^b`` levels below 8 bits) -> ``DequantizeLinear``,
  ``mmcd::quantize`` -> the same without the ``DequantizeLinear`` (a
  convolution's input codes), ``mmcd::dequantize`` -> per-axis
  ``DequantizeLinear`` of the integer weight. The TorchScript exporter
  stops at opset 20, before ONNX's 4-bit types (opset 21): every
  activation width is carried in ``uint8``, or ``int8`` for the signed
  grids of the ``tensorrt`` profile (clipped to their ``2^b`` levels), and
  integer weights of 2-8 bits in ``int8`` initializers, the same integers,
  which computes the same model;
* :func:`deploy_config`: mmdeploy's post-processing parameters taken from
  the detector's own ``test_cfg``;
* rewriters (:data:`REWRITERS`) where mmdeploy's post-processing is not
  mmdet's: the RPN's NMS per level (:func:`rpn_proposals_per_level_nms`),
  every class with its own regressed box in the RoI head
  (:func:`rcnn_detections_per_class_boxes`) and Cascade R-CNN's stages
  refined by class (:func:`cascade_stages_refined_by_class`);
* ``End2EndDetector`` (:func:`end2end_detector`): one static-shape model
  per padded input shape run by onnxruntime
  (:func:`~.onnx_export.ort_session`'s QDQ session options), or the same
  function in PyTorch (the detector under the rewriters), its outputs
  turned into mmdet's ``DetDataSample`` by mmdeploy's own ``End2EndModel``
  post-processing (boxes rescaled, masks pasted), then boxes clipped to the
  original image as mmdet clips them.

With these, on an unpadded image the exported function detects what
mmdet's ``predict`` does (tested). What still differs, by mmdeploy's
design: the image size inside the graph is the padded input's (one static
file serves every image of that padded shape), so proposals and boxes are
clipped to the padded input instead of each image's own size before RoI
pooling. ``tools/deploy/export_onnx.py --scope detector --eval`` measures
what that costs on the float model.
"""
import copy
import os.path as osp
from typing import Dict, List, Tuple

import torch
from torch import nn

from mmcd.compat.mmdeploy_torch import torchscript_export
from mmcd.core.quant.qdq import integer_levels

from .onnx_export import check_onnx, fold_biases, ort_session

#: opsets of the end-to-end export: per-axis DequantizeLinear needs 13, the
#: TorchScript exporter goes up to 20
END2END_MIN_OPSET, END2END_MAX_OPSET = 13, 20
#: its default
END2END_OPSET = 17
#: ONNX TensorProto data types of uint8 and int8
_UINT8, _INT8 = 2, 3
_registered = set()


def _zero_point_symbolic(g, zero_point, signed):
    """The zero point cast to the codes' integer type, and whether signed."""
    from torch.onnx import symbolic_helper
    signed = bool(symbolic_helper._get_const(signed, 'b', 'signed'))
    return g.op('Cast', zero_point, to_i=_INT8 if signed else _UINT8), signed


def _quantize_codes_symbolic(g, x, scale, bits, zero, signed):
    """QuantizeLinear, clipped to the ``bits``-bit range when below 8 bits."""
    from torch.onnx import symbolic_helper
    bits = symbolic_helper._get_const(bits, 'i', 'bits')
    quantized = g.op('QuantizeLinear', x, scale, zero)
    if bits != 8:
        dtype = torch.int8 if signed else torch.uint8
        levels = [g.op('Constant', value_t=torch.tensor(v, dtype=dtype))
                  for v in integer_levels(bits, signed)]
        quantized = g.op('Clip', quantized, *levels)
    return quantized


def _quantize_symbolic(g, x, scale, zero_point, bits, signed):
    zero, signed = _zero_point_symbolic(g, zero_point, signed)
    return _quantize_codes_symbolic(g, x, scale, bits, zero, signed)


def _quantize_dequantize_symbolic(g, x, scale, zero_point, bits, signed):
    zero, signed = _zero_point_symbolic(g, zero_point, signed)
    return g.op('DequantizeLinear',
                _quantize_codes_symbolic(g, x, scale, bits, zero, signed),
                scale, zero)


def _dequantize_symbolic(g, q, scale, zero_point, bits, axis, signed):
    from torch.onnx import symbolic_helper
    axis = symbolic_helper._get_const(axis, 'i', 'axis')
    zero, _ = _zero_point_symbolic(g, zero_point, signed)
    return g.op('DequantizeLinear', q, scale, zero, axis_i=axis)


def _exp2_symbolic(g, x):
    two = g.op('Constant', value_t=torch.tensor(2.0))
    return g.op('Pow', g.op('CastLike', two, x), x)


def register_symbolics(opset: int = END2END_OPSET) -> None:
    """Register the TorchScript symbolics of ``mmcd::quantize_dequantize``,
    ``mmcd::quantize`` and ``mmcd::dequantize`` (module docstring) for
    ``opset``, and of ``aten::exp2`` (the log-sqrt2 quantizer's levels,
    which the TorchScript exporter lacks) as ``Pow(2, x)``."""
    if opset in _registered:
        return
    for name, symbolic in (
            ('mmcd::quantize_dequantize', _quantize_dequantize_symbolic),
            ('mmcd::quantize', _quantize_symbolic),
            ('mmcd::dequantize', _dequantize_symbolic),
            ('aten::exp2', _exp2_symbolic)):
        torch.onnx.register_custom_op_symbolic(name, symbolic, opset)
    _registered.add(opset)


#: RPN proposals scoring at most this are dropped by the exported NMS
#: (:func:`rpn_proposals_per_level_nms`)
RPN_MIN_SCORE = 1e-12


def rpn_proposals_per_level_nms(self, cls_scores, bbox_preds,
                                score_factors=None, batch_img_metas=None,
                                cfg=None, rescale=False, with_nms=True,
                                **kwargs):
    """``RPNHead.predict_by_feat`` for the export, as mmdet 3 computes it:
    per level the ``nms_pre`` best anchors, decoded and clipped; boxes no
    wider or taller than ``min_bbox_size`` dropped; NMS **per level**
    (mmdet's ``batched_nms`` with the level as the class), then the
    ``max_per_img`` best over all levels. mmdeploy's own rewriter runs one
    NMS over all levels together, which lets a box of one level suppress
    another level's and changes the proposals (measured on the toy Mask
    R-CNN: 0.4 box AP). Written with ``multiclass_nms`` (ONNX
    ``NonMaxSuppression``) taking the levels as classes: each box scores in
    its level's column only, and the other columns' zeros are dropped by a
    score threshold of :data:`RPN_MIN_SCORE` (a real proposal scoring below
    it is dropped too). Returns ``(dets [1, K, 5], level [1, K])`` as
    mmdeploy's RPN rewriter returns its ``(dets, labels)``, without the
    zero-score padding row that mmdeploy's keeps as a proposal."""
    from mmdeploy.codebase.mmdet.deploy import get_post_processing_params
    from mmdeploy.core import FUNCTION_REWRITER
    from mmdeploy.mmcv.ops import multiclass_nms
    if not with_nms:
        raise ValueError('the exported RPN applies its NMS (with_nms=True)')
    cfg = self.test_cfg if cfg is None else cfg
    deploy_cfg = FUNCTION_REWRITER.get_context().cfg
    nms_pre = cfg.get('nms_pre', -1)
    levels = len(cls_scores)
    priors = self.prior_generator.grid_priors(
        [s.shape[-2:] for s in cls_scores], device=cls_scores[0].device)
    batch = cls_scores[0].shape[0]
    boxes, level_scores = [], []
    for level, (cls_score, bbox_pred, prior) in enumerate(
            zip(cls_scores, bbox_preds, priors)):
        score = cls_score.permute(0, 2, 3, 1).reshape(
            batch, -1, self.cls_out_channels)
        score = score.sigmoid()[..., 0] if self.use_sigmoid_cls else \
            score.softmax(-1)[..., 0]
        delta = bbox_pred.permute(0, 2, 3, 1).reshape(
            batch, -1, self.bbox_coder.encode_size)
        prior = prior.unsqueeze(0).expand(batch, -1, -1)
        if 0 < nms_pre < score.shape[1]:
            score, index = score.topk(nms_pre, dim=1)
            delta = delta.gather(1, index.unsqueeze(-1).expand(
                -1, -1, delta.shape[-1]))
            prior = prior.gather(1, index.unsqueeze(-1).expand(
                -1, -1, prior.shape[-1]))
        boxes.append(self.bbox_coder.decode(
            prior, delta, max_shape=batch_img_metas[0]['img_shape']))
        column = torch.zeros(levels, dtype=score.dtype,
                             device=score.device)
        column[level] = 1
        level_scores.append(score.unsqueeze(-1) * column)
    boxes = torch.cat(boxes, dim=1)
    scores = torch.cat(level_scores, dim=1)
    min_size = cfg.get('min_bbox_size', -1)
    if min_size >= 0:
        width = boxes[..., 2] - boxes[..., 0]
        height = boxes[..., 3] - boxes[..., 1]
        scores = scores * ((width > min_size) & (height > min_size)
                           ).unsqueeze(-1).to(scores.dtype)
    post = get_post_processing_params(deploy_cfg)
    dets, levels = multiclass_nms(
        boxes, scores, max_output_boxes_per_class=cfg.max_per_img,
        iou_threshold=cfg.nms.get('iou_threshold', post.iou_threshold),
        score_threshold=RPN_MIN_SCORE, pre_top_k=-1,
        keep_top_k=cfg.max_per_img)
    # multiclass_nms appends a zero box scoring 0, kept when fewer than
    # max_per_img boxes survive: as a proposal it would be classified like
    # any other (batch 1: export_detector exports one image)
    real = dets[0, :, 4] > 0
    return dets[:, real], levels[:, real]


def rcnn_detections_per_class_boxes(self, rois, cls_scores, bbox_preds,
                                    batch_img_metas, rcnn_test_cfg=None,
                                    rescale=False):
    """``BBoxHead.predict_by_feat`` for the export, as mmdet 3 computes it:
    every class's score with **that class's** regressed box, scores above
    ``score_thr``, NMS per class, the ``max_per_img`` best. mmdeploy's own
    rewriter keeps one box per RoI, the one of its highest-scoring class,
    and gives it to every class (ONNX ``NonMaxSuppression`` shares boxes
    across classes), which changes every detection of a RoI's other
    classes (measured on the toy Mask R-CNN: a quarter of the detections).
    Here each (RoI, class) is a box of its own scoring in its class's
    column only (``N x C`` boxes; the zeros are below ``score_thr``).
    Returns ``(dets [N, K, 5], labels [N, K])`` as mmdeploy's does."""
    import torch.nn.functional as F
    from mmdeploy.mmcv.ops import multiclass_nms
    from mmdet.structures.bbox import get_box_tensor
    cfg = rcnn_test_cfg
    scores = self.loss_cls.get_activation(cls_scores) \
        if self.custom_cls_channels else F.softmax(cls_scores, dim=-1)
    scores = scores[..., :self.num_classes]
    boxes = get_box_tensor(self.bbox_coder.decode(
        rois[..., 1:], bbox_preds,
        max_shape=batch_img_metas[0]['img_shape']))
    batch, count, classes = scores.shape
    if not self.reg_class_agnostic:
        boxes = boxes.reshape(batch, count * classes, 4)
        scores = (scores.unsqueeze(-1) * torch.eye(
            classes, dtype=scores.dtype, device=scores.device)).reshape(
                batch, count * classes, classes)
    return multiclass_nms(
        boxes, scores, max_output_boxes_per_class=cfg.max_per_img,
        iou_threshold=cfg.nms.iou_threshold, score_threshold=cfg.score_thr,
        pre_top_k=-1, keep_top_k=cfg.max_per_img)


def cascade_stages_refined_by_class(self, x, batch_img_metas,
                                    rpn_results_list, rcnn_test_cfg,
                                    rescale=False, **kwargs):
    """``CascadeRoIHead.predict_bbox`` for the export, as mmdet 3 computes
    it: between stages each RoI is refined with the box regressed for its
    highest-scoring class (mmdet's ``regress_by_class``), the final scores
    are the mean of the stages', and the last head post-processes
    (:func:`rcnn_detections_per_class_boxes`). mmdeploy's rewriter takes
    class-agnostic regression only and fails on the Swin repository's
    Cascade Mask R-CNN, whose heads regress per class. Batch 1."""
    from mmdet.structures.bbox import get_box_tensor
    boxes = rpn_results_list[0][..., :4]  # [1, K, 4]
    img_shape = batch_img_metas[0]['img_shape']
    scores = []
    for stage in range(self.num_stages):
        rois = torch.cat([boxes.new_zeros(boxes.shape[:2] + (1, )), boxes],
                         dim=-1)
        result = self._bbox_forward(stage, x, rois[0])
        cls_score, bbox_pred = result['cls_score'], result['bbox_pred']
        scores.append(cls_score)
        if stage == self.num_stages - 1:
            break
        head = self.bbox_head[stage]
        if head.custom_activation:
            cls_score = head.loss_cls.get_activation(cls_score)
        if not head.reg_class_agnostic:
            size = head.bbox_coder.encode_size
            label = cls_score[:, :-1].argmax(dim=1)
            index = (label * size).unsqueeze(-1) + torch.arange(
                size, device=label.device)
            bbox_pred = bbox_pred.gather(1, index)
        boxes = get_box_tensor(head.bbox_coder.decode(
            boxes, bbox_pred[None], max_shape=img_shape))
    return self.bbox_head[-1].predict_by_feat(
        rois=rois, cls_scores=(sum(scores) / len(scores))[None],
        bbox_preds=bbox_pred[None], batch_img_metas=batch_img_metas,
        rcnn_test_cfg=rcnn_test_cfg, rescale=rescale)


#: mmcd's rewriters of mmdet functions for the onnxruntime backend (which
#: mmdeploy prefers over its default ones): what mmdeploy computes
#: differently from mmdet there
REWRITERS = {
    'mmdet.models.dense_heads.rpn_head.RPNHead.predict_by_feat':
    rpn_proposals_per_level_nms,
    'mmdet.models.roi_heads.bbox_heads.bbox_head.BBoxHead.predict_by_feat':
    rcnn_detections_per_class_boxes,
    'mmdet.models.roi_heads.cascade_roi_head.CascadeRoIHead.predict_bbox':
    cascade_stages_refined_by_class,
}
_rewriters_registered = False


def import_mmdeploy() -> None:
    """Import mmdeploy, register its mmdet rewriters and mmcd's
    (:data:`REWRITERS`); an ImportError that says how to install mmdeploy
    when it is missing."""
    global _rewriters_registered
    try:
        from mmdeploy.codebase import import_codebase
        from mmdeploy.core import FUNCTION_REWRITER
        from mmdeploy.utils import Codebase
    except ImportError:
        raise ImportError('the end-to-end export needs mmdeploy: pip install '
                          '--no-deps -r requirements/mmdeploy.txt') from None
    import_codebase(Codebase.MMDET)
    if not _rewriters_registered:
        for name, rewriter in REWRITERS.items():
            FUNCTION_REWRITER.register_rewriter(
                name, backend='onnxruntime')(rewriter)
        _rewriters_registered = True


def deploy_config(model_cfg, opset: int = END2END_OPSET):
    """mmdeploy's deploy config for a static-shape onnxruntime export of
    ``model_cfg`` (an mmengine Config with a two-stage detector's
    ``test_cfg``). Its ``post_processing`` is what mmdeploy's rewriters read
    where a model's ``test_cfg`` says nothing; mmcd's (:data:`REWRITERS`)
    read ``test_cfg`` itself. The values mirror ``test_cfg.rcnn``, with no
    score threshold for proposals (mmdet's RPN has none)."""
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
    fold_biases(detector, path)
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
            self.fixed_file = None  # use_file: no exports of other shapes
            super().__init__('onnxruntime', [], 'cpu',
                             deploy_config(model_cfg, opset),
                             model_cfg=model_cfg,
                             data_preprocessor=detector.data_preprocessor)

        def _init_wrapper(self, backend, backend_files, device):
            """No backend wrapper: :meth:`outputs` runs the model."""

        def use_file(self, path: str) -> None:
            """Run the end-to-end model ``path`` (made elsewhere from an
            export of this detector, e.g. quantized by another tool) for
            images of its input shape; images of another shape are
            refused."""
            import onnx
            dims = onnx.load(path, load_external_data=False).graph.input[
                0].type.tensor_type.shape.dim
            self.sessions = {tuple(d.dim_value for d in dims):
                             ort_session(path)}
            self.fixed_file = path

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
            if key not in self.sessions and self.fixed_file:
                (shape, ) = self.sessions
                raise ValueError(
                    f'{self.fixed_file} takes images of {list(shape)}, got '
                    f'one of {list(key)}: pad every image to that shape')
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
