"""The yardstick of the sim-vs-deploy check: how far a deployed model may
differ from the PyTorch simulation and still compute the same model.

* :class:`RuntimeDraw`: the simulation with every quantized Linear,
  Conv2d and MatMul summing over its contraction in another order (as
  another runtime's kernels block and order the sum,
  :class:`SummationDraw`) and the input of every activation quantizer
  moved by at most one float32 rounding (another implementation of the
  elementwise op before it, :class:`RoundingDraw`): the spread of such
  draws is the yardstick;
* :class:`ComparedFeatures`: a runtime's features checked against the
  simulation's on every evaluated image, in quantization steps;
* :func:`changed_detections` / :func:`matched_detections`: how much two
  runs' detections differ, image by image (features that differ by a
  rounding step decide the score only through the detections they
  change)."""
import contextlib
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mmcd.core.quant.convert import activation_quantizers
from mmcd.core.quant.modules import QuantConv2d, QuantLinear, QuantMatMul

#: (boxes ``[N, 4]`` x1y1x2y2, scores ``[N]``, labels ``[N]``) of one image
Detections = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix ``[len(a), len(b)]`` of x1y1x2y2 boxes."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(
        min=1e-12)


def matched_detections(reference: Detections, other: Detections,
                       iou: float = 0.9) -> int:
    """Detections of ``reference`` with a counterpart in ``other``: same
    label, IoU >= ``iou``, one-to-one, taken greedily in the reference's
    score order, each the free candidate of highest IoU."""
    ref_boxes, ref_scores, ref_labels = reference
    boxes, _, labels = other
    if not len(ref_boxes) or not len(boxes):
        return 0
    overlaps = box_iou(ref_boxes.double(), boxes.double())
    overlaps[ref_labels[:, None] != labels[None, :]] = -1
    free = torch.ones(len(boxes), dtype=torch.bool)
    matched = 0
    for i in torch.argsort(ref_scores, descending=True).tolist():
        candidates = torch.where(free, overlaps[i], torch.tensor(-1.0,
                                 dtype=overlaps.dtype))
        best = int(candidates.argmax())
        if candidates[best] >= iou:
            free[best] = False
            matched += 1
    return matched


def changed_detections(reference: Sequence[Detections],
                       other: Sequence[Detections],
                       iou: float = 0.9) -> dict:
    """Over all images: detections of either run without a counterpart in
    the other (:func:`matched_detections`), ``changed`` of ``total`` (both
    runs' detections), and the images where any changed."""
    if len(reference) != len(other):
        raise ValueError(f'{len(reference)} images against {len(other)}')
    changed = total = 0
    images: List[int] = []
    for index, (ref, oth) in enumerate(zip(reference, other)):
        kept = matched_detections(ref, oth, iou)
        diff = len(ref[0]) + len(oth[0]) - 2 * kept
        changed += diff
        total += len(ref[0]) + len(oth[0])
        if diff:
            images.append(index)
    return dict(changed=changed, total=total, images=images)


class SimulationDraw(nn.Module):
    """``extract_feat`` of ``detector`` (a reference, not a submodule) with
    the hooks :meth:`install` returns in place for one pass, their random
    choices drawn from ``seed``: a draw of the same quantized model whose
    float arithmetic differs from the simulation's the way a subclass says.
    ``with draw.applied():`` makes the whole detector that draw (its heads
    too) for the block: the end-to-end check evaluates it so.
    """

    def __init__(self, detector, seed: int):
        super().__init__()
        self.__dict__['detector'] = detector  # a reference, not a submodule
        self.seed = seed

    def install(self, gen: torch.Generator) -> list:
        """Register this draw's hooks on ``self.detector``; their handles."""
        raise NotImplementedError

    @contextlib.contextmanager
    def applied(self):
        """This draw's hooks on the detector within the block, their random
        choices drawn from one generator seeded with ``seed``."""
        handles = self.install(torch.Generator().manual_seed(self.seed))
        try:
            yield self.detector
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, images):
        with self.applied():
            return self.detector.extract_feat(images)


def moved_by_one_rounding(x: torch.Tensor,
                          gen: torch.Generator) -> torch.Tensor:
    """Each value of ``x`` to its next float32 below, above, or left as is
    (uniformly)."""
    direction = torch.randint(-1, 2, x.shape, generator=gen).to(x)
    moved = torch.nextafter(x, direction * math.inf)
    return torch.where(direction == 0, x, moved)


class RoundingDraw(SimulationDraw):
    """The input of every activation quantizer moved by at most one float32
    rounding (:func:`moved_by_one_rounding`). The same quantized model,
    another draw of which values sit just across a rounding boundary, as
    another implementation of the elementwise op before each quantizer
    (LayerNorm, softmax, GELU: another exp or erf, one rounding apart)
    gives; weights are left alone (the export stores them as the same
    integers). A lower bound of what another runtime changes: its sums over
    a contraction round more than once (:class:`SummationDraw`)."""

    def install(self, gen):
        def move(quantizer, args):
            return (moved_by_one_rounding(args[0], gen), ) + args[1:]
        return [q.register_forward_pre_hook(move)
                for q in activation_quantizers(self.detector)]


def contraction_chunks(size: int, gen: torch.Generator,
                       max_chunks: int = 4) -> List[slice]:
    """``[0, size)`` cut at 1..``max_chunks - 1`` distinct random points,
    the pieces in random order (one piece when ``size`` is 1)."""
    chunks = int(torch.randint(2, max_chunks + 1, (1, ), generator=gen))
    chunks = min(chunks, size)
    cuts = (torch.randperm(size - 1, generator=gen)[:chunks - 1] + 1).sort()
    bounds = [0, *cuts.values.tolist(), size]
    pieces = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return [pieces[i] for i in torch.randperm(len(pieces), generator=gen)]


def reordered_output(module: nn.Module, inputs: tuple,
                     gen: torch.Generator) -> Optional[torch.Tensor]:
    """``module``'s output (a quantized Linear, Conv2d or MatMul) with the
    sum over its contraction (input features, input channels, the inner
    dimension) taken chunk by chunk in float32, the chunks' partial results
    added in random order (:func:`contraction_chunks`); the bias is added
    last. A grouped convolution keeps its own order (``None``)."""
    if isinstance(module, QuantMatMul):
        a = module.quantizer_a(inputs[0])
        b = module.quantizer_b(inputs[1])
        return sum(a[..., s] @ b[..., s, :]
                   for s in contraction_chunks(a.shape[-1], gen))
    x = module.input_quantizer(inputs[0])
    weight = module.effective_weight()
    if isinstance(module, QuantLinear):
        bias = module.shift_corrected_bias(weight)
        out = sum(F.linear(x[..., s], weight[:, s])
                  for s in contraction_chunks(weight.shape[1], gen))
    elif module.groups == 1:
        bias = module.bias
        out = sum(module._conv_forward(x[:, s], weight[:, s], None)
                  for s in contraction_chunks(weight.shape[1], gen))
        bias = None if bias is None else bias.view(-1, 1, 1)
    else:
        return None
    return out if bias is None else out + bias


class SummationDraw(SimulationDraw):
    """Every quantized Linear, Conv2d and MatMul sums over its contraction
    in another order: split at random points into 2-4 chunks whose partial
    sums are added in random order (:func:`reordered_output`). The same
    quantized operands and the same model in exact arithmetic; only the
    float32 rounding of the accumulation differs, as it does between
    PyTorch's and another runtime's kernels, which block and order the sum
    their own way. The accumulated error grows with the contraction length
    (a random walk of roundings), so a value near a quantization boundary
    flips more often than under :class:`RoundingDraw`'s single rounding."""

    def install(self, gen):
        def reorder(module, inputs, output):
            return reordered_output(module, inputs, gen)
        return [m.register_forward_hook(reorder)
                for m in self.detector.modules()
                if isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul))]


class RuntimeDraw(SimulationDraw):
    """Both ways another runtime's float arithmetic differs: contractions
    summed in another order (:class:`SummationDraw`) and the elementwise
    ops before each quantizer one rounding apart (:class:`RoundingDraw`).
    The yardstick of the sim-vs-deploy check: an export that deviates from
    the simulation as much as such draws do computes the same model."""

    def install(self, gen):
        return (SummationDraw.install(self, gen) +
                RoundingDraw.install(self, gen))


@torch.no_grad()
def feature_consumer(detector, batch: dict) -> Optional[nn.Module]:
    """The first activation quantizer ``detector`` applies after its
    ``extract_feat`` has returned (the heads' input quantizer: the RPN's
    convolution in Mask R-CNN, the first encoder projection in DINO), found
    by running ``detector.test_step(batch)``; None when the heads quantize
    nothing. Its step is the unit in which the features are compared."""
    quantizers = activation_quantizers(detector)
    state = dict(features_done=False, found=None)
    extract_feat = detector.extract_feat

    def tracked(*args, **kwargs):
        out = extract_feat(*args, **kwargs)
        state['features_done'] = True
        return out

    def note(quantizer, args):
        if state['features_done'] and state['found'] is None:
            state['found'] = quantizer

    handles = [q.register_forward_pre_hook(note) for q in quantizers]
    object.__setattr__(detector, 'extract_feat', tracked)
    try:
        detector.test_step(batch)
    finally:
        object.__delattr__(detector, 'extract_feat')
        for handle in handles:
            handle.remove()
    return state['found']


class ComparedFeatures:
    """``features(images)`` (e.g. :class:`OnnxPerShape`) that also measures,
    on every call, its deviation from ``reference(images)`` (the fake-
    quantized model's ``extract_feat``) in units of ``step``: the largest
    per feature level over all calls, and how many values were more than
    one step apart. Used as a detector's ``extract_feat`` during a test-set
    evaluation, it checks every image's features, not one."""

    def __init__(self, features, reference, step: float):
        self.features, self.reference, self.step = features, reference, step
        self.max_steps: List[float] = []
        self.beyond_one_step = 0
        self.values = 0
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> List[torch.Tensor]:
        out = self.features(images)
        with torch.no_grad():
            expected = self.reference(images)
        steps = [(a - b).abs() / self.step for a, b in zip(out, expected)]
        largest = [float(s.max()) for s in steps]
        self.max_steps = largest if not self.max_steps else [
            max(a, b) for a, b in zip(self.max_steps, largest)]
        self.beyond_one_step += sum(int((s > 1).sum()) for s in steps)
        self.values += sum(s.numel() for s in steps)
        self.calls += 1
        return out

    def summary(self) -> dict:
        return dict(calls=self.calls, max_steps=self.max_steps,
                    beyond_one_step=self.beyond_one_step, values=self.values)


#: the draws of the simulation a yardstick can be made of, by name
DRAWS = {'runtime': RuntimeDraw, 'summation': SummationDraw,
         'rounding': RoundingDraw}
