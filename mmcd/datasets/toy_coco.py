"""Deterministic generator of a small COCO-format instance-segmentation set.

The set stands in for COCO where COCO cannot be downloaded (CI, laptops, this
project's demo). Every image is a textured background with a few filled
shapes of four categories (circle, square, triangle, star) of varied size and
colour. Shapes are painted in order, so later shapes occlude earlier ones; an
instance's mask, box and area describe only its *visible* part, and instances
that are almost fully hidden are dropped. Unoccluded instances are stored as
polygons, occluded ones as compressed RLE, so both COCO mask encodings are
exercised. The output is read as-is by ``pycocotools.coco.COCO`` and by
MMDetection's ``CocoDataset`` / ``CocoMetric``.

Images are PNG (lossless), and image ``i`` of a split depends only on
``(seed, split, i)``: the same arguments always give the same bytes.
"""
import json
import math
import os
import os.path as osp
from dataclasses import dataclass
from typing import Dict, List

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CATEGORIES = ('circle', 'square', 'triangle', 'star')
SPLIT_SEED_OFFSET = {'train': 0, 'val': 1_000_003}


@dataclass(frozen=True)
class ToyCocoSpec:
    """Size and content of the generated set.

    Args:
        num_train: images in the train split.
        num_val: images in the val split.
        min_side / max_side: image sides are drawn uniformly in this range.
        max_objects: at most this many shapes per image (at least 1).
        seed: global seed; change it to get another, equally valid, set.
    """
    num_train: int = 64
    num_val: int = 16
    min_side: int = 192
    max_side: int = 288
    max_objects: int = 6
    seed: int = 0

    def __post_init__(self):
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError('num_train and num_val must be >= 1, got '
                             f'{self.num_train} and {self.num_val}')
        if not 64 <= self.min_side <= self.max_side:
            raise ValueError('need 64 <= min_side <= max_side, got '
                             f'{self.min_side}, {self.max_side}')
        if self.max_objects < 1:
            raise ValueError(f'max_objects must be >= 1, got {self.max_objects}')


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured BGR background: gradient + one of stripes/checker/blobs + noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    tilt = rng.uniform(-0.3, 0.3, size=(2, 3)).astype(np.float32)
    img = base + yy[..., None] * tilt[0] + xx[..., None] * tilt[1]
    kind = rng.integers(3)
    amp = rng.uniform(10, 35)
    if kind == 0:  # stripes at a random angle
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(6, 24)
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) / period
        img += amp * np.sin(2 * math.pi * phase)[..., None]
    elif kind == 1:  # checkerboard
        cell = int(rng.integers(8, 32))
        img += amp * (((yy // cell + xx // cell) % 2) * 2 - 1)[..., None]
    else:  # smooth random blobs
        coarse = rng.uniform(-1, 1, size=(h // 16 + 2, w // 16 + 2))
        img += amp * cv2.resize(coarse.astype(np.float32), (w, h),
                                interpolation=cv2.INTER_CUBIC)[..., None]
    img += rng.normal(0, 6, size=(h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, category: str, h: int,
                w: int) -> np.ndarray:
    """A filled shape of ``category`` at a random place, size and rotation."""
    size = rng.uniform(0.12, 0.45) * min(h, w)
    cx = rng.uniform(size / 2, w - size / 2)
    cy = rng.uniform(size / 2, h - size / 2)
    angle = rng.uniform(0, 2 * math.pi)
    mask = np.zeros((h, w), np.uint8)
    if category == 'circle':
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(size / 2), 1, -1)
        return mask
    if category == 'square':
        radii, corners = [size / math.sqrt(2)] * 4, 4
    elif category == 'triangle':
        radii, corners = [size / 2] * 3, 3
    elif category == 'star':
        radii, corners = [size / 2, size / 4.5] * 5, 10
    else:
        raise ValueError(f'unknown category {category!r}')
    pts = [(cx + r * math.cos(angle + 2 * math.pi * k / corners),
            cy + r * math.sin(angle + 2 * math.pi * k / corners))
           for k, r in enumerate(radii)]
    cv2.fillPoly(mask, [np.round(np.array(pts)).astype(np.int32)], 1)
    return mask


def _mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours
            if len(c) >= 3]


def _render_image(rng: np.random.Generator, h: int, w: int,
                  max_objects: int):
    """Paint shapes in order; return the image and the visible instances."""
    img = _background(rng, h, w)
    painted = []  # (category index, full mask)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cat = int(rng.integers(len(CATEGORIES)))
        mask = _shape_mask(rng, CATEGORIES[cat], h, w)
        color = rng.integers(0, 256, size=3)
        shade = rng.uniform(0.75, 1.0, size=(h, w, 1))
        img = np.where(mask[..., None] > 0, (color * shade).astype(np.uint8),
                       img)
        painted.append((cat, mask))
    instances = []
    covered = np.zeros((h, w), bool)
    for cat, mask in reversed(painted):  # topmost first
        visible = (mask > 0) & ~covered
        if visible.sum() < 0.3 * mask.sum() or visible.sum() < 48:
            covered |= mask > 0
            continue  # hidden too much to be a fair target
        segmentation, rle = _encode_segmentation(
            visible.astype(np.uint8), occluded=bool(visible.sum() < mask.sum()))
        # a polygon rasterizes a little differently from the pixels it came
        # from: mark what it claims as covered too, so instances stay disjoint
        covered |= (mask > 0) | mask_utils.decode(rle).astype(bool)
        instances.append((cat, segmentation, rle))
    return img, instances[::-1]


def _encode_segmentation(visible: np.ndarray, occluded: bool):
    """Occluded instances as compressed RLE, others as polygons; returns the
    JSON segmentation and the RLE that pycocotools decodes it to."""
    if occluded:
        rle = mask_utils.encode(np.asfortranarray(visible))
        return {'size': rle['size'], 'counts': rle['counts'].decode('ascii')
                }, rle
    polygons = _mask_to_polygons(visible)
    h, w = visible.shape
    return polygons, mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))


def _annotation(segmentation, rle, ann_id: int, img_id: int, cat: int
                ) -> Dict:
    """COCO annotation whose area and bbox are those of its segmentation as
    pycocotools decodes it."""
    return dict(id=ann_id, image_id=img_id, category_id=cat + 1,
                segmentation=segmentation,
                area=float(mask_utils.area(rle)),
                bbox=[float(v) for v in mask_utils.toBbox(rle)], iscrowd=0)


def generate_split(out_dir: str, split: str, spec: ToyCocoSpec) -> Dict:
    """Write ``out_dir/{split}/*.png`` and return the split's COCO dict."""
    num_images = spec.num_train if split == 'train' else spec.num_val
    img_dir = osp.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for idx in range(num_images):
        rng = np.random.default_rng(
            [spec.seed, SPLIT_SEED_OFFSET[split], idx])
        h, w = (int(v) for v in rng.integers(spec.min_side,
                                             spec.max_side + 1, size=2))
        img, instances = _render_image(rng, h, w, spec.max_objects)
        img_id = idx + 1
        file_name = f'{split}_{idx:05d}.png'
        cv2.imwrite(osp.join(img_dir, file_name), img)
        images.append(dict(id=img_id, file_name=file_name, height=h,
                           width=w))
        for cat, segmentation, rle in instances:
            annotations.append(
                _annotation(segmentation, rle, len(annotations) + 1, img_id,
                            cat))
    categories = [dict(id=i + 1, name=n, supercategory='shape')
                  for i, n in enumerate(CATEGORIES)]
    return dict(info=dict(description=f'mmcd toy COCO ({split})',
                          version='1.0'),
                images=images, annotations=annotations,
                categories=categories)


def ann_file(data_root: str, split: str) -> str:
    return osp.join(data_root, 'annotations', f'instances_{split}.json')


def generate_toy_coco(data_root: str, spec: ToyCocoSpec = ToyCocoSpec()
                      ) -> Dict[str, str]:
    """Generate train and val splits under ``data_root``.

    Layout (as MMDetection's COCO configs expect)::

        data_root/annotations/instances_{train,val}.json
        data_root/{train,val}/*.png

    A ``spec.json`` records the spec; ``ensure_toy_coco`` uses it to decide
    whether an existing folder can be reused. Returns the annotation paths.
    """
    os.makedirs(osp.join(data_root, 'annotations'), exist_ok=True)
    paths = {}
    for split in ('train', 'val'):
        coco = generate_split(data_root, split, spec)
        paths[split] = ann_file(data_root, split)
        with open(paths[split], 'w') as f:
            json.dump(coco, f)
    with open(osp.join(data_root, 'spec.json'), 'w') as f:
        json.dump(spec.__dict__, f, sort_keys=True)
    return paths


def ensure_toy_coco(data_root: str, spec: ToyCocoSpec = ToyCocoSpec()
                    ) -> Dict[str, str]:
    """Generate the set unless ``data_root`` already holds it for ``spec``."""
    spec_file = osp.join(data_root, 'spec.json')
    paths = {s: ann_file(data_root, s) for s in ('train', 'val')}
    if osp.isfile(spec_file) and all(osp.isfile(p) for p in paths.values()):
        with open(spec_file) as f:
            if json.load(f) == spec.__dict__:
                return paths
    return generate_toy_coco(data_root, spec)
