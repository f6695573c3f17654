"""tools/analysis/sensitivity.py on the micro toy detector: ranked layers,
the SQNR bounds that must hold, and the mixed-precision configs it writes."""
import json
import os.path as osp

import pytest
from mmengine.config import Config
from mmengine.runner import Runner

from mmcd.engine.hooks import PostTrainingQuantHook
from test_tools_cli import (assert_one_line_error, run_tool,
                            run_here)


def test_sqnr_ranking_and_keep_configs(micro_run, tmp_path):
    config, ckpt = micro_run
    code, out = run_tool('tools/analysis/sensitivity.py', config, ckpt,
                         '--quant', 'w4a4', '--calib-images', '4', '--keep',
                         '1', '3', '--avg-w-bits', '4.5', '--out-dir',
                         str(tmp_path), timeout=600)
    assert code == 0, out
    result = json.load(open(tmp_path / 'sensitivity.json'))
    budget, params = result['weight_budget'], result['weight_params']
    average = (4 * sum(params.values()) + 4 * sum(
        params[n] for n in budget['layers'])) / sum(params.values())
    assert budget['average'] == pytest.approx(average) and average <= 4.5
    assert budget['layers'] and result['keep_configs'][-1].endswith(
        'avgw4.5_w4a4.py')
    layers = [r for r in result['ranking'] if r['kind'] == 'layer']
    blocks = [r for r in result['ranking'] if r['kind'] == 'block']
    assert len(layers) > 40 and len(blocks) == 5  # toy Swin: 1+1+2+1
    assert result['none_quantized'] == float('inf')  # float == reference
    only = [r['only'] for r in layers]
    assert only == sorted(only)  # ranked, most sensitive first
    for row in result['ranking']:
        # one layer (block) quantized is less noisy than all of them, and
        # taking it out of the quantized set never adds noise beyond float
        assert row['only'] > result['all_quantized'] - 1e-6
        assert row['all_but'] >= result['all_quantized'] - 1.0
    assert osp.getsize(tmp_path / 'sensitivity.png') > 0
    assert '| 1 | layer |' in open(tmp_path / 'sensitivity.md').read()
    for k, path in zip((1, 3), result['keep_configs'][:2]):
        hooks = [h for h in Config.fromfile(path).custom_hooks
                 if h['type'] == 'PostTrainingQuantHook']
        assert len(hooks) == 1
        assert hooks[0]['calib'] == dict(num_images=4)  # as measured
        rules = hooks[0]['layer_bits']
        assert [r['pattern'] for r in rules] == [
            f'^{r["name"].replace(".", chr(92) + ".")}$'
            for r in layers[:k]]
        PostTrainingQuantHook(**{k: v for k, v in hooks[0].items()
                                 if k != 'type'})


def test_map_metric_is_the_test_set_map(micro_run, tmp_path):
    """--metric map evaluates the test set with the chosen quantizers on:
    none on is the float model's mAP, all on the PTQ hook's (same
    calibration images), each measured unit in between is a test-set mAP."""
    config, ckpt = micro_run
    code, out = run_tool('tools/analysis/sensitivity.py', config, ckpt,
                         '--quant', 'w4a4', '--calib-images', '4',
                         '--metric', 'map', '--layers', r'^neck\.fpn_convs',
                         '--keep', '1', '--out-dir', str(tmp_path),
                         timeout=600)
    assert code == 0, out
    result = json.load(open(tmp_path / 'sensitivity.json'))
    assert sorted(r['name'] for r in result['ranking']) == [
        f'neck.fpn_convs.{i}.conv' for i in range(4)]
    cfg = Config.fromfile(config)
    cfg.work_dir, cfg.load_from = str(tmp_path / 'float'), ckpt
    float_map = Runner.from_cfg(cfg).test()['coco/bbox_mAP']
    cfg.work_dir = str(tmp_path / 'ptq')
    cfg.custom_hooks = [dict(type='PostTrainingQuantHook', w_bits=4,
                             a_bits=4, calib=dict(num_images=4))]
    quant_map = Runner.from_cfg(cfg).test()['coco/bbox_mAP']
    assert float_map > 0  # so that the comparison below can fail
    assert result['none_quantized'] == pytest.approx(float_map, abs=1e-9)
    assert result['all_quantized'] == pytest.approx(quant_map, abs=1e-9)
    for row in result['ranking']:
        assert 0 <= row['only'] <= 1 and 0 <= row['all_but'] <= 1


def test_errors(micro_run, tmp_path):
    config, ckpt = micro_run
    code, out = run_here('tools/analysis/sensitivity.py', config, ckpt,
                         '--quant', 'w9a4')
    assert_one_line_error(code, out, '2..8')
    code, out = run_here('tools/analysis/sensitivity.py', config,
                         str(tmp_path / 'nope.pth'), '--quant', 'w4a4')
    assert_one_line_error(code, out, 'does not exist')
    code, out = run_here('tools/analysis/sensitivity.py', config, ckpt,
                         '--quant', 'w4a4', '--avg-w-bits', '9')
    assert_one_line_error(code, out, '--avg-w-bits must lie in [4, 8]')
    code, out = run_here('tools/analysis/sensitivity.py', config, ckpt,
                         '--quant', 'w4a4', '--layers', 'blocks.(')
    assert_one_line_error(code, out, "--layers 'blocks.(':")
    code, out = run_here('tools/analysis/sensitivity.py', config, ckpt,
                         '--quant', 'w4a4', '--calib-images', '2',
                         '--layers', 'no_such_layer')
    assert_one_line_error(code, out, 'matches no quantized layer')


def test_quant_debug_tool(micro_run, tmp_path):
    config, ckpt = micro_run
    code, out = run_tool('tools/analysis/quant_debug.py', config, ckpt,
                         '--quant', 'w4a4', '--calib-images', '4',
                         '--out-dir', str(tmp_path), timeout=600)
    assert code == 0, out
    report = json.load(open(tmp_path / 'quant_debug.json'))
    compared = {n: e for n, e in report.items()
                if e['output_sqnr'] is not None}
    assert all(n.startswith(('backbone.', 'neck.', 'rpn_head.'))
               for n in compared) and len(compared) > 40
    table = open(tmp_path / 'quant_debug.md').read().splitlines()[4:]
    listed = [float(line.split('|')[3]) for line in table]
    assert listed == sorted(listed)  # lowest output SQNR first
    assert osp.getsize(tmp_path / 'worst_inputs.png') > 0
