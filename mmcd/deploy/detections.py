"""How much two runs' detections differ, image by image: the output-level
yardstick of the sim-vs-deploy check (features that differ by a rounding
step decide the score only through the detections they change)."""
from typing import List, Sequence, Tuple

import torch

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
