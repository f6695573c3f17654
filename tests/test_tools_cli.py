"""The tools fail on bad input with one line that says what to do."""
import json
import os
import io
import os.path as osp
import runpy
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from conftest import REPO, TOY_CONFIG
from mmcd.utils.runner_setup import dropped_annotations, error_line


def run_tool(*args, cwd=None, timeout=300):
    """Run a tool as a user would; ``timeout`` only guards against hangs."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def run_here(*args):
    """Run a tool's ``__main__`` in this interpreter as ``python TOOL ARGS``
    would (``sys.argv``, the tool's folder first on ``sys.path``, the repo
    as working directory) and return ``(exit status, printed output)``.

    For argument and configuration errors, where the ~9 s a new
    interpreter spends importing torch and mmdet is most of a call; runs
    that check what a tool logs while it works use :func:`run_tool`
    (loggers made earlier in this process print elsewhere). One test per
    tool keeps the subprocess path."""
    path = osp.join(REPO, args[0])
    saved = sys.argv, list(sys.path), os.getcwd()
    sys.argv = [path, *args[1:]]
    sys.path.insert(0, osp.dirname(path))
    os.chdir(REPO)
    out, code = io.StringIO(), 0
    try:
        with redirect_stdout(out), redirect_stderr(out):
            try:
                runpy.run_path(path, run_name='__main__')
            except SystemExit as exc:  # as the interpreter reports it
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
                    code = 1
                else:
                    code = exc.code or 0
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        os.chdir(saved[2])
    return code, out.getvalue()


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
                          f'make_toy_coco.py {tmp_path}/x/')


def test_test_rejects_non_checkpoint(micro_data_root, tmp_path):
    bogus = tmp_path / 'model.pth'
    bogus.write_text('not a checkpoint')
    root = micro_data_root
    code, out = run_tool(
        'tools/test.py', TOY_CONFIG, str(bogus), '--work-dir', str(tmp_path),
        '--cfg-options', f'test_dataloader.dataset.data_root={root}',
        f'test_evaluator.ann_file={root}annotations/instances_val.json')
    assert_one_line_error(code, out, 'is not a PyTorch checkpoint')
    assert 'Config:' not in out  # checked before the config is printed


def test_broken_data_warns_and_fails_in_one_line(micro_data_root, tmp_path):
    """An annotation mmdet drops (negative width) is counted in a warning,
    in train.py and test.py; a missing image file, hit in a dataloader
    worker, ends the run in one line naming the file."""
    from test_train_tool import data_options
    root = tmp_path / 'broken'
    shutil.copytree(micro_data_root, root)
    for split in ('train', 'val'):
        ann_file = root / 'annotations' / f'instances_{split}.json'
        coco = json.loads(ann_file.read_text())
        coco['annotations'][0]['bbox'][2] = -5.0
        ann_file.write_text(json.dumps(coco))
        missing = root / split / coco['images'][-1]['file_name']
        os.remove(missing)
    options = ['--cfg-options', *data_options(f'{root}/'),
               'train_dataloader.num_workers=1']
    code, out = run_tool('tools/train.py', TOY_CONFIG, '--work-dir',
                         str(tmp_path / 'train'), *options)
    assert_one_line_error(code, out, 'No such file or directory',
                          str(root / 'train'))
    warning, = [line for line in out.splitlines()
                if 'dropped by mmdet' in line and 'train_dataloader' in line]
    assert '1 of ' in warning and '1: box without area inside the image ' \
        '(outside it, or width or height <= 0) (e.g. id ' in warning
    ckpt = tmp_path / 'model.pth'
    torch.save({}, ckpt)
    code, out = run_tool('tools/test.py', TOY_CONFIG, str(ckpt),
                         '--work-dir', str(tmp_path / 'test'), *options)
    assert_one_line_error(code, out, 'No such file or directory',
                          str(missing))
    assert sum('dropped by mmdet' in line for line in out.splitlines()) == 1


@pytest.mark.parametrize('rank, warned',
                         [(None, True), ('0', True), ('1', False)])
def test_dropped_annotations_counted_once_on_rank_0(tmp_path, monkeypatch,
                                                    rank, warned):
    from mmengine.config import Config

    from mmcd.utils import runner_setup
    (tmp_path / 'img').mkdir()
    ann = tmp_path / 'ann.json'
    ann.write_text(json.dumps(dict(
        images=[dict(id=1, width=10, height=10, file_name='a.png')],
        categories=[dict(id=1, name='circle')],
        annotations=[dict(id=1, image_id=1, category_id=1,
                          bbox=[1, 1, -3, 2], area=4)])))
    dataset = dict(type='CocoDataset', data_root=f'{tmp_path}/',
                   ann_file='ann.json', data_prefix=dict(img='img/'),
                   metainfo=dict(classes=('circle', )))
    cfg = Config(dict(val_dataloader=dict(dataset=dataset),
                      test_dataloader=dict(dataset=dataset)))
    lines = []
    monkeypatch.setattr(runner_setup, 'print_log',
                        lambda msg, **kwargs: lines.append(msg))
    monkeypatch.delenv('RANK', raising=False)
    if rank is not None:
        monkeypatch.setenv('RANK', rank)
    runner_setup.check_datasets(cfg, ['val_dataloader', 'test_dataloader'])
    assert len(lines) == int(warned)  # the shared file counted once
    if warned:
        assert lines[0].startswith('val_dataloader: 1 of 1 annotations')


def test_dropped_annotations_follow_mmdet():
    """Each reason mmdet 3.3's CocoDataset.parse_data_info skips an
    annotation for, on a 100x50 image (hand-made cases)."""
    coco = dict(
        images=[dict(id=1, width=100, height=50)],
        categories=[dict(id=3, name='circle'), dict(id=7, name='kite')],
        annotations=[
            dict(id=1, image_id=1, category_id=3, bbox=[10, 10, 20, 20],
                 area=400),                                    # kept
            dict(id=2, image_id=1, category_id=3, bbox=[120, 10, 5, 5],
                 area=25),                                     # outside
            dict(id=3, image_id=1, category_id=3, bbox=[10, 10, -4, 5],
                 area=20),                                     # w < 1
            dict(id=4, image_id=1, category_id=3, bbox=[10, 10, 5, 5],
                 area=0),                                      # area 0
            dict(id=5, image_id=1, category_id=7, bbox=[10, 10, 5, 5],
                 area=25),                                     # class
        ])
    dropped = dropped_annotations(coco, ('circle', 'square'))
    assert {reason: [a['id'] for a in anns]
            for reason, anns in dropped.items()} == {
        'box without area inside the image (outside it, or width or '
        'height <= 0)': [2, 3],
        'width or height < 1 or area <= 0': [4],
        'category not among the classes': [5]}


@pytest.mark.parametrize('load, threads, warned', [
    (2.5, None, True), (0.3, None, False), (2.5, '1', False)])
def test_busy_machine_warning(monkeypatch, load, threads, warned):
    from mmcd.utils import runner_setup
    lines = []
    monkeypatch.setattr(runner_setup, 'print_log',
                        lambda msg, **kwargs: lines.append(msg))
    monkeypatch.setattr(os, 'getloadavg', lambda: (load, load, load))
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    if threads is not None:
        monkeypatch.setenv('OMP_NUM_THREADS', threads)
    runner_setup.warn_if_oversubscribed()
    assert bool(lines) is warned
    if warned:
        assert 'load 2.5 on 2 cores' in lines[0] and \
            'OMP_NUM_THREADS=1' in lines[0]


def test_error_line_of_a_dataloader_worker_error():
    worker = FileNotFoundError(
        'Caught FileNotFoundError in DataLoader worker process 0.\n'
        'Original Traceback (most recent call last):\n'
        '  File "x.py", line 1, in f\n'
        "FileNotFoundError: [Errno 2] No such file or directory: 'a.png'\n")
    assert error_line(worker) == (
        "error: FileNotFoundError: [Errno 2] No such file or directory: "
        "'a.png'")
    assert error_line(ValueError('bad\nvalue')) == 'error: bad value'


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


def test_resume_before_the_first_checkpoint_keeps_load_from(micro_run,
                                                              tmp_path):
    """--resume in a work dir without a checkpoint starts from the config's
    load_from (a fine-tuning run interrupted early), not from random
    weights; once a checkpoint exists, it resumes from it."""
    config, ckpt = micro_run
    options = ['--work-dir', str(tmp_path), '--resume', '--cfg-options',
               f'load_from={ckpt}']
    code, out = run_tool('tools/train.py', config, *options)
    assert code == 0, out
    assert f'no checkpoint in {tmp_path} yet; starting from load_from' in out
    assert f'Load checkpoint from {ckpt}' in out
    code, out = run_tool('tools/train.py', config, *options,
                         'train_cfg.max_epochs=2')
    assert code == 0, out
    assert f'Resumed checkpoint from {tmp_path}/epoch_1.pth' in out or \
        'resumed epoch: 1' in out, out[-3000:]


@pytest.mark.parametrize('options', [
    {'custom_imports': dict(imports=['my_cli_plugin'])},
    {'custom_imports.imports': ['my_cli_plugin']}])
def test_cfg_options_custom_imports_are_imported(tmp_path, monkeypatch,
                                                  options):
    """``--cfg-options custom_imports.imports=[...]`` (the dotted form a
    user types) imports its modules like the whole dict does."""
    from mmcd.utils.runner_setup import load_config
    (tmp_path / 'my_cli_plugin.py').write_text('LOADED = True\n')
    (tmp_path / 'cfg.py').write_text('x = 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, 'my_cli_plugin', raising=False)
    load_config(str(tmp_path / 'cfg.py'), options)
    assert sys.modules['my_cli_plugin'].LOADED
