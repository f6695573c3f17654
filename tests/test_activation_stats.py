"""Outlier statistics on hand-made tensors, the ActivationStatsHook on the
toy detector, and the outliers.py plots from two checkpoints."""
import glob
import json
import os.path as osp

import pytest
import torch
from mmengine.runner import Runner

from conftest import micro_config
from mmcd.core.activation_stats import StatsAccumulator, tensor_stats
from test_tools_cli import TOY_CONFIG, run_tool


def test_stats_hand_computed():
    stats = tensor_stats(torch.tensor([1.0, -1.0, 1.0, -1.0, 10.0]))
    # mean 2, deviations (-1,-3,-1,-3,8): var 84/5, 4th moment 4260/5
    assert stats['kurtosis'] == pytest.approx((4260 / 5) / (84 / 5)**2)
    assert stats['max_abs'] == 10
    assert stats['max_over_median'] == 10  # median |x| is 1
    assert stats['p9999'] == 1  # 4 of 5 values: index 3 of the sorted |x|
    torch.manual_seed(0)
    gauss = tensor_stats(torch.randn(1_000_000))
    assert gauss['kurtosis'] == pytest.approx(3.0, abs=0.02)


def test_accumulator_is_exact_across_batches():
    torch.manual_seed(0)
    a, b = torch.randn(1000) * 3, torch.randn(500) + 2
    acc = StatsAccumulator(max_samples=10_000)
    acc.update(a)
    acc.update(b)
    whole = tensor_stats(torch.cat([a, b]))
    got = acc.result()
    for key in ('max_abs', 'kurtosis', 'max_over_median', 'p9999'):
        assert got[key] == pytest.approx(whole[key], rel=1e-6), key


@pytest.fixture(scope='module')
def trained(micro_data_root, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('stats_train')
    Runner.from_cfg(micro_config(micro_data_root, work_dir)).train()
    return osp.join(work_dir, 'epoch_1.pth')


def test_hook_logs_scalars_and_writes_json(micro_data_root, trained,
                                           tmp_path):
    cfg = micro_config(micro_data_root, tmp_path)
    cfg.load_from = trained
    cfg.custom_hooks = [dict(type='ActivationStatsHook', stages=('test', ))]
    runner = Runner.from_cfg(cfg)
    runner.test()
    with open(osp.join(runner.log_dir, 'activation_stats_test.json')) as f:
        result = json.load(f)
    # toy Swin: 5 blocks x (output, ffn_hidden, attn_input); 15 pairs
    assert len(result['stats']) == 15 and len(result['alignment']) == 15
    point = result['stats']['backbone.stages.2.blocks.1/ffn_hidden']
    assert point['max_abs'] >= point['p9999'] > 0
    assert point['kurtosis'] > 1
    scalars = open(glob.glob(osp.join(runner.log_dir, 'vis_data',
                                      'scalars.json'))[0]).read()
    assert 'outliers/backbone.stages.0.blocks.0/output/max_abs' in scalars
    assert 'alignment/backbone.stages.0.blocks.0.qk/mean' in scalars


def test_outliers_tool_plots_two_checkpoints(micro_data_root, trained,
                                             tmp_path):
    ckpt = torch.load(trained, weights_only=False)
    key = 'backbone.stages.2.blocks.1.ffn.layers.0.0.weight'
    ckpt['state_dict'][key] = ckpt['state_dict'][key] * 20
    louder = str(tmp_path / 'louder.pth')
    torch.save(ckpt, louder)
    out_dir = tmp_path / 'plots'
    code, out = run_tool(
        'tools/analysis/outliers.py', TOY_CONFIG, trained, louder,
        '--labels', 'base', 'louder', '--num-images', '2', '--out-dir',
        str(out_dir), '--cfg-options',
        f'test_dataloader.dataset.data_root={micro_data_root}',
        'test_dataloader.num_workers=0',
        'test_dataloader.persistent_workers=False')
    assert code == 0, out
    for png in ('max_activation.png', 'alignment.png', 'histogram.png'):
        path = out_dir / png
        assert path.stat().st_size > 10_000, png
        assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with open(out_dir / 'outliers.json') as f:
        result = json.load(f)
    hidden = 'backbone.stages.2.blocks.1/ffn_hidden'
    assert result['louder']['stats'][hidden]['max_abs'] > \
        5 * result['base']['stats'][hidden]['max_abs']
    assert 'worst layer: ' + hidden in out
