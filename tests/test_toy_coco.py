import hashlib
import json
import os
import os.path as osp

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mmcd.datasets import CATEGORIES, ToyCocoSpec, generate_toy_coco
from mmcd.datasets.toy_coco import ensure_toy_coco

SPEC = ToyCocoSpec(num_train=6, num_val=3, min_side=96, max_side=160,
                   max_objects=5, seed=3)


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(osp.join(dirpath, name), 'rb') as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_generation_is_deterministic(tmp_path):
    generate_toy_coco(str(tmp_path / 'a'), SPEC)
    generate_toy_coco(str(tmp_path / 'b'), SPEC)
    generate_toy_coco(str(tmp_path / 'c'), ToyCocoSpec(
        **{**SPEC.__dict__, 'seed': 4}))
    assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b')
    assert _digest(tmp_path / 'a') != _digest(tmp_path / 'c')


@pytest.fixture(scope='module')
def coco_train(tmp_path_factory):
    root = tmp_path_factory.mktemp('toy')
    paths = generate_toy_coco(str(root), SPEC)
    return root, COCO(paths['train'])


def test_annotations_are_valid_for_pycocotools(coco_train):
    root, coco = coco_train
    assert len(coco.imgs) == SPEC.num_train
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(
        CATEGORIES)
    kinds = set()
    for ann in coco.anns.values():
        img = coco.imgs[ann['image_id']]
        assert osp.isfile(root / 'train' / img['file_name'])
        x, y, w, h = ann['bbox']
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= img['width'] and y + h <= img['height']
        mask = coco.annToMask(ann)
        assert mask.shape == (img['height'], img['width'])
        # area is the area of the mask pycocotools decodes
        assert ann['area'] == mask.sum() > 0
        # the box is the tight box of that mask
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (
            x, y, x + w, y + h)
        kinds.add(type(ann['segmentation']).__name__)
    assert kinds == {'list', 'dict'}, 'both polygons and RLE are exercised'


def test_occluded_instances_exclude_hidden_pixels(coco_train):
    _, coco = coco_train
    rle_anns = [a for a in coco.anns.values()
                if isinstance(a['segmentation'], dict)]
    assert rle_anns
    # visible masks of one image never overlap (occlusion removes pixels)
    for img_id in coco.imgs:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        total = sum(coco.annToMask(a).astype(int) for a in anns)
        assert int(np.max(total)) <= 1


def test_mmdet_reads_the_set(coco_train):
    from mmdet.datasets import CocoDataset
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    root, _ = coco_train
    ds = CocoDataset(
        data_root=str(root), ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'), metainfo=dict(classes=CATEGORIES),
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations', with_bbox=True,
                       with_mask=True)])
    sample = ds[0]
    assert sample['gt_masks'].masks.shape[0] == len(sample['gt_bboxes'])
    assert not sample['gt_ignore_flags'].any()


def test_ensure_reuses_and_regenerates(tmp_path):
    root = str(tmp_path)
    ensure_toy_coco(root, SPEC)
    stamp = os.path.getmtime(osp.join(root, 'annotations',
                                      'instances_train.json'))
    ensure_toy_coco(root, SPEC)  # same spec: reused
    assert os.path.getmtime(osp.join(
        root, 'annotations', 'instances_train.json')) == stamp
    bigger = ToyCocoSpec(**{**SPEC.__dict__, 'num_train': 7})
    ensure_toy_coco(root, bigger)
    with open(osp.join(root, 'annotations', 'instances_train.json')) as f:
        assert len(json.load(f)['images']) == 7


@pytest.mark.parametrize('kwargs', [dict(num_train=0), dict(min_side=32),
                                    dict(min_side=300, max_side=200),
                                    dict(max_objects=0)])
def test_bad_spec_is_rejected(kwargs):
    with pytest.raises(ValueError):
        ToyCocoSpec(**kwargs)


def test_rle_counts_are_json_strings(coco_train):
    _, coco = coco_train
    ann = next(a for a in coco.anns.values()
               if isinstance(a['segmentation'], dict))
    assert isinstance(ann['segmentation']['counts'], str)
    rle = coco.annToRLE(ann)
    assert mask_utils.area(rle) == pytest.approx(ann['area'])
