import contextlib
import copy
import os
import os.path as osp
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

# the tools' start (before torch): warning filter, huge pages for large
# tensors (tools/_bootstrap.py)
sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                            'tools'))
import _bootstrap  # noqa: E402,F401

import mmcd  # noqa: E402,F401
from mmengine.config import Config  # noqa: E402

from mmcd.datasets import ToyCocoSpec, ensure_toy_coco  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY_CONFIG = osp.join(REPO, 'configs', 'toy',
                      'mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco.py')
MICRO_SPEC = ToyCocoSpec(num_train=8, num_val=4, min_side=96, max_side=128,
                         max_objects=3, seed=7)


@pytest.fixture(scope='session')
def micro_data_root(tmp_path_factory):
    """A micro toy COCO set (8 train / 4 val images), made once per run."""
    root = str(tmp_path_factory.mktemp('toy_coco'))
    ensure_toy_coco(root, MICRO_SPEC)
    return root + '/'


@pytest.fixture(scope='session')
def micro_run(micro_data_root, tmp_path_factory):
    """The micro toy detector trained one epoch: (config file, checkpoint),
    made once per run (the analysis and deploy tools' tests)."""
    from mmengine.runner import Runner
    work_dir = tmp_path_factory.mktemp('micro_train')
    cfg = micro_config(micro_data_root, work_dir)
    Runner.from_cfg(cfg).train()
    config = osp.join(work_dir, 'micro.py')
    cfg.dump(config)
    return config, osp.join(work_dir, 'epoch_1.pth')


def _processes_tagged(tag: str):
    """PIDs of this machine's processes whose environment holds ``tag``."""
    needle = tag.encode()
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/environ', 'rb') as f:
                if needle in f.read():
                    yield int(entry)
        except OSError:  # gone, or not ours to read
            continue


def _command_line(pid: int) -> str:
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f'{pid}: ' + f.read().replace(b'\0', b' ').decode()[:200]
    except OSError:
        return f'{pid}: (gone)'


def run_bounded(cmd, timeout: float, env=None, grace: float = 15):
    """Run ``cmd`` (e.g. torchrun and its workers) and return its exit code
    and output; past ``timeout`` seconds, fail the test.

    Every process the command starts carries a tag in its environment, so
    all of them, torchrun's workers included (torchrun starts each in a
    session of its own), are killed at the end, however it ends: a hang is a
    test failure within ``timeout``, never a CI time-out or a stray process.
    A process of the command still alive ``grace`` seconds after the
    command exited (a dataloader worker outliving its run) fails the test
    too. Output goes to a file, not a pipe that a surviving grandchild
    could hold open.
    """
    tag = f'MMCD_TEST_RUN={uuid.uuid4().hex}'
    env = dict(os.environ if env is None else env)
    env[tag.split('=')[0]] = tag.split('=')[1]
    with tempfile.TemporaryFile('w+') as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT,
                                start_new_session=True)
        survivors = []
        try:
            proc.wait(timeout)
            deadline = time.monotonic() + grace
            while True:
                survivors = [_command_line(pid)
                             for pid in _processes_tagged(tag)]
                if not survivors or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        except subprocess.TimeoutExpired:
            pass
        finally:
            for pid in _processes_tagged(tag):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        output = log.read()
    if proc.returncode == -signal.SIGKILL:
        pytest.fail(f'{" ".join(map(str, cmd[:6]))} ... did not finish in '
                    f'{timeout} s; its output ended with:\n{output[-4000:]}')
    if survivors:
        pytest.fail(f'{len(survivors)} process(es) outlived '
                    f'{" ".join(map(str, cmd[:3]))} by {grace} s: '
                    f'{survivors}; its output ended with:\n{output[-2000:]}')
    return proc.returncode, output


def micro_config(data_root, work_dir, base=TOY_CONFIG, img_scale=(128, 128),
                 max_epochs=1):
    """A config file's content pointed at the micro set: smaller images, a
    one-epoch schedule, no worker processes, no visualisation."""
    cfg = Config.fromfile(base)
    cfg.work_dir = str(work_dir)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dl = cfg[loader]
        dl.num_workers = 0
        dl.persistent_workers = False
        dl.dataset.data_root = data_root
        for t in dl.dataset.pipeline:
            if t['type'] == 'Resize':
                t['scale'] = img_scale
    for ev in ('val_evaluator', 'test_evaluator'):
        cfg[ev].ann_file = osp.join(data_root,
                                    'annotations/instances_val.json')
    if cfg.train_cfg.get('type') == 'IterBasedTrainLoop':
        cfg.train_cfg.max_iters = 4 * max_epochs  # an epoch of 8 images
        cfg.train_cfg.val_interval = 4 * max_epochs
    else:
        cfg.train_cfg.max_epochs = max_epochs
        cfg.train_cfg.val_interval = max_epochs
    for aug in cfg.model.data_preprocessor.get('batch_augments') or []:
        aug['size'] = img_scale
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
             end=2)
    ]
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1)
    if cfg.train_cfg.get('type') == 'IterBasedTrainLoop':
        cfg.default_hooks.checkpoint.update(interval=4 * max_epochs,
                                            by_epoch=False)
    cfg.default_hooks.pop('visualization', None)
    cfg.log_processor.window_size = 1
    cfg.randomness = dict(seed=0)
    # MMEngine's logger and visualizer are named singletons: give each
    # runner its own, or a later runner writes into an earlier one's dirs
    cfg.experiment_name = f'micro_{uuid.uuid4().hex[:8]}'
    cfg.visualizer.name = cfg.experiment_name
    return copy.deepcopy(cfg)


def dist_train(config: str, nproc: int = 2, timeout: float = 300):
    """``tools/dist_train.sh CONFIG NPROC`` as a user runs it (torchrun,
    gloo on CPU, the standalone rendezvous on a free port); the test hook
    module ``rank_state_hook`` is importable. Returns the combined output;
    fails on a non-zero exit or past ``timeout``."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([REPO, osp.join(REPO, 'tests')]))
    code, output = run_bounded(
        ['bash', osp.join(REPO, 'tools', 'dist_train.sh'), config,
         str(nproc)], timeout=timeout, env=env)
    assert code == 0, output[-5000:]
    return output
