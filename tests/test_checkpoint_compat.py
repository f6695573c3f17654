"""torch >= 2.6 loads with weights_only=True; mmcd allow-lists exactly what
MMEngine 0.10.7 checkpoints pickle and reports anything else clearly."""
import collections
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner.checkpoint import CheckpointLoader

from mmcd.compat import CheckpointLoadError


def _mmengine_like_checkpoint():
    hub = MessageHub.get_instance('compat_test')
    hub.update_scalar('train/loss', np.float64(0.5))
    hub.update_scalar('train/loss', 0.25)
    hub.update_info('iter', np.int64(7))
    hub.update_info('mean', np.arange(3, dtype=np.float32))
    return dict(meta=dict(epoch=1, iter=7, seed=np.int64(3),
                          message_hub=hub.state_dict()),
                state_dict=collections.OrderedDict(w=torch.ones(2)))


def test_mmengine_checkpoint_round_trip(tmp_path):
    path = str(tmp_path / 'ckpt.pth')
    torch.save(_mmengine_like_checkpoint(), path)
    ckpt = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    hub = ckpt['meta']['message_hub']
    buf = hub['log_scalars']['train/loss']
    assert isinstance(buf, HistoryBuffer)
    assert buf.current() == 0.25 and buf.mean() == pytest.approx(0.375)
    assert hub['runtime_info']['iter'] == 7
    np.testing.assert_array_equal(hub['runtime_info']['mean'],
                                  np.arange(3, dtype=np.float32))
    assert ckpt['meta']['seed'] == 3
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(2))


class NotAllowListed:
    pass


def test_unexpected_class_fails_with_its_name(tmp_path):
    path = str(tmp_path / 'evil.pth')
    torch.save(dict(state_dict={}, extra=NotAllowListed()), path)
    with pytest.raises(CheckpointLoadError, match='NotAllowListed'):
        CheckpointLoader.load_checkpoint(path)
    # the global weights_only check is still on for plain torch.load
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / 'notes.pth'
    path.write_text('this is not a checkpoint')
    with pytest.raises(CheckpointLoadError, match='is not a PyTorch'):
        CheckpointLoader.load_checkpoint(str(path))
    with pytest.raises(CheckpointLoadError, match='does not exist'):
        CheckpointLoader.load_checkpoint(str(tmp_path / 'missing.pth'))


def test_getattr_is_restricted_to_history_buffer_statistics(tmp_path):
    """A pickled getattr on anything but a HistoryBuffer statistic fails."""

    class CallsGetattr:
        def __reduce__(self):
            return getattr, (np.zeros(1), 'tofile')

    path = str(tmp_path / 'getattr.pth')
    torch.save(dict(x=CallsGetattr()), path)
    with pytest.raises(CheckpointLoadError):
        CheckpointLoader.load_checkpoint(path)
