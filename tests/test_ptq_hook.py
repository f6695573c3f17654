"""PostTrainingQuantHook on the toy detector: float vs quantized mAP in one
run, JSON results, checkpoint untouched, no stacking, 8-bit fidelity."""
import copy
import hashlib
import json
import os.path as osp

import pytest
import torch
from mmengine.dataset import BaseDataset
from mmengine.runner import Runner

from conftest import micro_config
from mmcd.core.quant import QuantConfig, calibrate, quantize_model
from mmcd.core.quant.quantizers import FakeQuantizer
from mmcd.engine.hooks.post_training_quant_hook import comparison_table
from test_tools_cli import (TOY_CONFIG, assert_one_line_error, run_here,
                            run_tool)


@pytest.fixture(scope='module')
def trained(micro_data_root, tmp_path_factory):
    """A toy detector trained for one epoch on the micro set."""
    work_dir = tmp_path_factory.mktemp('ptq_train')
    runner = Runner.from_cfg(micro_config(micro_data_root, work_dir))
    runner.train()
    return osp.join(work_dir, 'epoch_1.pth')


def _digest(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_hook_reports_fp_and_quantized_map(micro_data_root, trained,
                                           tmp_path):
    cfg = micro_config(micro_data_root, tmp_path)
    cfg.load_from = trained
    cfg.custom_hooks = [dict(type='PostTrainingQuantHook', w_bits=4,
                             a_bits=4, method='dopq-vit', compare_fp=True,
                             calib=dict(num_images=4))]
    before = _digest(trained)
    runner = Runner.from_cfg(cfg)
    runner.test()
    weights = {k: v.clone() for k, v in runner.model.state_dict().items()}
    with open(osp.join(tmp_path, 'quant_results.json')) as f:
        results = json.load(f)
    assert (results['w_bits'], results['a_bits'], results['method'],
            results['calib_images']) == (4, 4, 'dopq-vit', 4)
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        assert -1 <= results['metrics'][key] <= 1
        assert -1 <= results['fp_metrics'][key] <= 1
    log = open(osp.join(runner.log_dir, osp.basename(runner.log_dir) +
                        '.log')).read()
    assert 'W4A4 dopq-vit' in log and 'drop' in log
    # the precision plan: logged as a table, saved per layer
    assert 'PostTrainingQuantHook: precision plan' in log
    plan = {row['name']: row for row in results['plan']}
    assert plan['backbone.patch_embed.projection']['a_bits'] == 8
    assert plan['roi_head.mask_head.upsample']['why'] == \
        'not quantized (ConvTranspose2d)'
    # the evaluated model is put back, float, and the checkpoint untouched
    assert not any(isinstance(m, FakeQuantizer)
                   for m in runner.model.modules())
    assert _digest(trained) == before
    runner.test()  # a second run calibrates a fresh copy: nothing stacks
    for k, v in runner.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert not any(isinstance(m, FakeQuantizer)
                   for m in runner.model.modules())


def _table_rows(fp_metrics, metrics):
    table = comparison_table(dict(w_bits=4, a_bits=4, method='repq-vit',
                                  fp_metrics=fp_metrics, metrics=metrics))
    return {line.split()[0]: [float(x) for x in line.split()[1:]]
            for line in table.splitlines()[2:]}


def test_comparison_table_rows_follow_the_evaluator():
    """COCO instance and panoptic metrics (Mask2Former's panoptic config
    reports both) get their rows; an evaluator reporting none of them
    (VOC) gets every metric it reports, never an empty table."""
    rows = _table_rows(
        {'coco/bbox_mAP': 0.5, 'coco/bbox_mAP_s': 0.1, 'coco_panoptic/PQ':
         40.0},
        {'coco/bbox_mAP': 0.4, 'coco/bbox_mAP_s': 0.1, 'coco_panoptic/PQ':
         37.5})
    assert rows == {'coco/bbox_mAP': [0.5, 0.4, 0.1],
                    'coco_panoptic/PQ': [40.0, 37.5, 2.5]}
    assert _table_rows({'pascal_voc/mAP': 0.75, 'pascal_voc/AP50': 0.9},
                       {'pascal_voc/mAP': 0.5}) == {
                           'pascal_voc/mAP': [0.75, 0.5, 0.25]}


def test_one_calibration_image_as_repq_vit_on_coco(micro_data_root, trained,
                                                  tmp_path):
    """RepQ-ViT calibrates COCO on one image: calib.num_images=1 works, in
    one pass with quantization on, and every layer the image reaches is
    calibrated."""
    cfg = micro_config(micro_data_root, tmp_path)
    cfg.load_from = trained
    cfg.custom_hooks = [dict(type='PostTrainingQuantHook', w_bits=4,
                             a_bits=4, method='repq-vit',
                             calib=dict(num_images=1))]
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    assert -1 <= metrics['coco/bbox_mAP'] <= 1
    log = open(osp.join(runner.log_dir, osp.basename(runner.log_dir) +
                        '.log')).read()
    assert "PTQ: calibrated on 1 images: {'method': 'repq-vit'" in log
    assert "'reparameterized': 13" in log  # 5 blocks x 2 + 3 merges
    assert 'stay in float' not in log


def test_tools_report_run_time_config_errors_in_one_line(micro_data_root,
                                                         trained):
    """Errors found once the Runner runs (too few calibration images, a
    layer_bits rule matching nothing, a float checkpoint under a QAT
    config) end tools/test.py in one line, like the up-front checks."""
    from test_train_tool import data_options
    data = ['--cfg-options', *data_options(micro_data_root)]
    code, out = run_tool('tools/test.py', TOY_CONFIG, trained, '--quant',
                         'w4a4', '--calib-images', '100', *data)
    assert_one_line_error(
        code, out, 'the calibration set has 8 images (after the dataset\'s '
        "filter_cfg={'filter_empty_gt': True, 'min_size': 8}",
        'fewer than the 100 asked for')
    code, out = run_tool('tools/test.py', TOY_CONFIG, trained, '--quant',
                         'w4a4', '--calib-images', '4', '--layer-bits',
                         r'stages\.9\.=w8a8', *data)
    assert_one_line_error(code, out, r"['stages\\.9\\.'] match no "
                          'quantized layer')
    qat = TOY_CONFIG.replace('.py', '_qat-w4a4.py')
    code, out = run_tool('tools/test.py', qat, trained, *data)
    assert_one_line_error(code, out, 'the QAT model is not calibrated')


@pytest.mark.parametrize('calib,message', [
    (dict(images=3), r"calib: unknown option\(s\) \['images'\]"),
    (dict(num_images=0), 'calib.num_images must be >= 1, got 0'),
])
def test_bad_calibration_options(calib, message):
    from mmcd.engine.hooks import PostTrainingQuantHook
    with pytest.raises(ValueError, match=message):
        PostTrainingQuantHook(calib=calib)


def test_calibration_options_defaults_and_values():
    from mmcd.engine import CalibrationOptions
    assert CalibrationOptions.from_dict(None) == CalibrationOptions(32, None, 0)
    loader = dict(batch_size=1)
    options = CalibrationOptions.from_dict(
        dict(num_images='4', dataloader=loader, seed=3))
    assert (options.num_images, options.dataloader, options.seed) == \
        (4, loader, 3)


def test_w8a8_detector_features_close_to_fp(micro_data_root, trained,
                                            tmp_path):
    cfg = micro_config(micro_data_root, tmp_path)
    cfg.load_from = trained
    runner = Runner.from_cfg(cfg)
    runner.load_checkpoint(trained)
    model = runner.model
    model.eval()
    batches = [model.data_preprocessor(b) for b, _ in
               zip(runner.build_dataloader(cfg.test_dataloader), range(4))]
    qcfg = QuantConfig(8, 8, 'repq-vit')
    qmodel = quantize_model(copy.deepcopy(model), qcfg)

    calibrate(qmodel, qcfg, lambda: qmodel.extract_feat(
        torch.cat([b['inputs'] for b in batches])))  # one batch
    with torch.no_grad():
        for b in batches:
            for ref, out in zip(model.extract_feat(b['inputs']),
                                qmodel.extract_feat(b['inputs'])):
                assert (out - ref).norm() / ref.norm() < 0.1


def test_cli_quant_shortcut_errors(trained):
    code, out = run_here('tools/test.py', TOY_CONFIG, trained, '--quant',
                         'w9a4')
    assert_one_line_error(code, out, '--quant', '2..8')
    code, out = run_here('tools/test.py', TOY_CONFIG, trained, '--quant',
                         'w4a4', '--quant-method', 'gptq')
    assert_one_line_error(code, out, 'unknown quantization method')
    code, out = run_here('tools/test.py', TOY_CONFIG, trained, '--quant',
                         'four')
    assert_one_line_error(code, out, 'wNaM')
    code, out = run_here('tools/test.py', TOY_CONFIG, trained, '--quant',
                         'w6a6', '--quant-profile', 'tensorrt')
    assert_one_line_error(code, out, '--quant', 'runs 8-bit integers only, '
                          'not the 6-bit of a_bits=6, w_bits=6')
    code, out = run_here('tools/test.py', TOY_CONFIG, trained, '--quant',
                         'w8a8', '--quant-profile', 'trt')
    assert_one_line_error(code, out, 'unknown deployment profile')
    code, out = run_here('tools/test.py', TOY_CONFIG, trained,
                         '--quant-profile', 'tensorrt')
    assert_one_line_error(code, out, '--quant-profile needs --quant')


def test_calibration_images_are_the_same_on_every_rank(micro_data_root,
                                                        tmp_path,
                                                        monkeypatch):
    """MMEngine's DefaultSampler would give each rank its own shard (and
    each rank its own calibration)."""
    from mmcd.engine import calibration_loader
    cfg = micro_config(micro_data_root, tmp_path)

    def image_ids(rank):
        monkeypatch.setattr('mmengine.dist.get_dist_info',
                            lambda *a: (rank, 2))
        monkeypatch.setattr('mmengine.dataset.sampler.get_dist_info',
                            lambda *a: (rank, 2))
        loader = calibration_loader(cfg, 4, seed=3)
        return [[s.img_id for s in b['data_samples']] for b in loader]

    rank0, rank1 = image_ids(0), image_ids(1)
    assert rank0 == rank1
    # the calibration set is the first batch: 4 distinct images; the
    # loader runs over the whole train set (8 images) in batches of 4
    assert [len(b) for b in rank0] == [4, 4]
    flat = [i for b in rank0 for i in b]
    assert sorted(flat) == sorted(set(flat))


def test_debug_logs_per_layer_sqnr(micro_data_root, trained, tmp_path,
                                   monkeypatch):
    loaded = []  # annotation file of every image a dataset prepares
    prepare = BaseDataset.prepare_data
    monkeypatch.setattr(BaseDataset, 'prepare_data', lambda self, idx: (
        loaded.append(osp.basename(self.ann_file)), prepare(self, idx))[1])
    cfg = micro_config(micro_data_root, tmp_path)
    cfg.load_from = trained
    cfg.visualizer.vis_backends = [dict(type='LocalVisBackend')]
    cfg.custom_hooks = [dict(type='PostTrainingQuantHook', w_bits=4,
                             a_bits=4, debug=True, calib=dict(num_images=4),
                             layer_bits=[dict(pattern=r'^neck\.',
                                              w_bits=8, a_bits=8)])]
    runner = Runner.from_cfg(cfg)
    runner.test()
    # the calibration images (train set) are loaded once, for calibration
    # and the float-vs-quantized comparison alike
    assert loaded.count('instances_train.json') == 4
    report = json.load(open(osp.join(runner.log_dir, 'quant_debug.json')))
    qkv = 'backbone.stages.0.blocks.0.attn.w_msa.qkv'
    assert report[qkv]['bits'] == dict(weight_quantizer=4,
                                       input_quantizer=4)
    assert report['neck.fpn_convs.0.conv']['bits']['weight_quantizer'] == 8
    # 8-bit weights of the neck are far less noisy than 4-bit ones
    assert report['neck.fpn_convs.0.conv']['weight_sqnr'] > \
        report[qkv]['weight_sqnr'] + 15
    assert report['roi_head.bbox_head.fc_cls']['output_sqnr'] is None
    scalars = open(osp.join(runner.log_dir, 'vis_data',
                            'scalars.json')).read()
    assert f'ptq_sqnr/output/{qkv}' in scalars
    log = open(osp.join(runner.log_dir, osp.basename(runner.log_dir) +
                        '.log')).read()
    assert 'lowest output SQNR' in log
