"""The tools fail on bad input with one line that says what to do."""
import os
import os.path as osp
import subprocess
import sys

import pytest

from conftest import REPO, TOY_CONFIG


def run_tool(*args, cwd=None, timeout=300):
    """Run a tool as a user would; ``timeout`` only guards against hangs."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def assert_one_line_error(code, output, *fragments):
    assert code != 0
    assert 'Traceback' not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith('error: '), output
    for fragment in fragments:
        assert fragment in last, last


def test_train_missing_config():
    code, out = run_tool('tools/train.py', 'configs/nope.py')
    assert_one_line_error(code, out, 'configs/nope.py does not exist')


def test_train_missing_dataset(tmp_path):
    code, out = run_tool(
        'tools/train.py', TOY_CONFIG, '--work-dir', str(tmp_path),
        '--cfg-options', f'train_dataloader.dataset.data_root={tmp_path}/x/')
    assert_one_line_error(code, out, 'annotation file', 'train_dataloader',
                          'make_toy_coco.py')


def test_test_rejects_non_checkpoint(micro_data_root, tmp_path):
    bogus = tmp_path / 'model.pth'
    bogus.write_text('not a checkpoint')
    root = micro_data_root
    code, out = run_tool(
        'tools/test.py', TOY_CONFIG, str(bogus), '--work-dir', str(tmp_path),
        '--cfg-options', f'test_dataloader.dataset.data_root={root}',
        f'test_evaluator.ann_file={root}annotations/instances_val.json')
    assert_one_line_error(code, out, 'is not a PyTorch checkpoint')


def test_test_missing_checkpoint(tmp_path):
    code, out = run_tool('tools/test.py', TOY_CONFIG,
                         str(tmp_path / 'missing.pth'))
    assert_one_line_error(code, out, 'missing.pth does not exist')


def test_make_toy_coco_cli(tmp_path):
    code, out = run_tool('tools/misc/make_toy_coco.py', str(tmp_path),
                         '--num-train', '2', '--num-val', '1')
    assert code == 0, out
    assert osp.isfile(tmp_path / 'annotations' / 'instances_val.json')


def test_cd_interval_needs_the_every_step_reference():
    code, out = run_tool('tools/analysis/cd_interval.py', '--intervals', '4')
    assert_one_line_error(code, out, '--intervals must include 1')


@pytest.mark.parametrize('preset, expected', [(None, '1'), ('0', '0')])
def test_bootstrap_turns_on_huge_pages_before_torch(preset, expected):
    """tools/_bootstrap.py sets PyTorch's THP_MEM_ALLOC_ENABLE before torch
    reads it (its first allocation), and keeps a value the user set."""
    env = {k: v for k, v in os.environ.items()
           if k != 'THP_MEM_ALLOC_ENABLE'}
    if preset is not None:
        env['THP_MEM_ALLOC_ENABLE'] = preset
    code = ('import os, sys; sys.path.insert(0, "tools"); import _bootstrap; '
            'import torch; print(os.environ["THP_MEM_ALLOC_ENABLE"])')
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected
