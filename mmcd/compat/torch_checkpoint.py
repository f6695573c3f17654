"""Load MMEngine 0.10.7 checkpoints under torch >= 2.6 without turning
``weights_only`` off.

torch 2.6 made ``torch.load(..., weights_only=True)`` the default. MMEngine
0.10.7 checkpoints pickle a few objects beyond tensors (the message hub's
``HistoryBuffer``, numpy arrays and scalars in its runtime info), so
``--resume`` and ``load_from`` fail out of the box. Instead of disabling the
check, :func:`allow_mmengine_checkpoint_globals` adds exactly these classes to
torch's allow-list (``torch.serialization.add_safe_globals``), and
:func:`load_from_local_weights_only` replaces MMEngine's local-file loader so that a
file that is not a checkpoint, or one that pickles another class, fails with
a one-line message that names the file and the offending globals.
"""
import os.path as osp
import pickle
import zipfile
from typing import Iterable, List

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader


class CheckpointLoadError(RuntimeError):
    """A checkpoint file could not be loaded; the message says why."""


def _numpy_globals() -> List:
    """Numpy objects that appear when arrays and scalars are pickled."""
    # numpy 2 pickles arrays through ``numpy._core``; numpy 1 through
    # ``numpy.core``. Both names resolve to the same function object here,
    # but the allow-list is keyed by the qualified name found in the file.
    reconstruct = np._core.multiarray._reconstruct  # noqa: SLF001
    scalar = np._core.multiarray.scalar  # noqa: SLF001
    dtype_classes = [type(np.dtype(t)) for t in (
        np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
        np.float16, np.float32, np.float64)]
    return [reconstruct, scalar, np.ndarray, np.dtype, *dtype_classes,
            (reconstruct, 'numpy.core.multiarray._reconstruct'),
            (scalar, 'numpy.core.multiarray.scalar')]


HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def history_buffer_getattr(obj, name: str):
    """``getattr`` restricted to what a pickled ``HistoryBuffer`` needs.

    ``HistoryBuffer._statistics_methods`` holds its default statistics as
    plain functions, which pickle as ``getattr(HistoryBuffer, 'mean')``.
    Allow-listing the real ``builtins.getattr`` would let a file reach any
    attribute (and call any method) of any object it can build, so the name
    ``builtins.getattr`` is bound to this function instead, which only
    returns those four functions.
    """
    if obj is HistoryBuffer and name in HISTORY_BUFFER_STATISTICS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'getattr({obj!r:.60}, {name!r}) is not allowed in a checkpoint')


MMENGINE_CHECKPOINT_GLOBALS = [
    HistoryBuffer, (history_buffer_getattr, 'builtins.getattr'),
    *_numpy_globals()
]


def allow_mmengine_checkpoint_globals(extra: Iterable = ()) -> None:
    """Add what MMEngine checkpoints pickle (and ``extra``) to torch's
    ``weights_only`` allow-list. Idempotent."""
    torch.serialization.add_safe_globals(
        [*MMENGINE_CHECKPOINT_GLOBALS, *extra])


def _one_line_reason(err: Exception) -> str:
    """The informative line of a (often multi-paragraph) torch.load error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if line.endswith('WeightsUnpickler error:'):
            return lines[i + 1]
    return lines[0][:200] if lines else type(err).__name__


def load_from_local_weights_only(filename: str, map_location=None,
                                 mmap: bool = False):
    """MMEngine's local-path checkpoint loader with ``weights_only=True`` and
    errors a user can act on (MMEngine logs it as the "local_weights_only"
    backend). ``mmap``: map the tensors' storage instead of reading it
    (zip-format files; others are read), for a check of the file that
    leaves the loading to later."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise CheckpointLoadError(f'checkpoint {filename} does not exist')
    try:
        return torch.load(filename, map_location=map_location,
                          weights_only=True,
                          mmap=mmap and zipfile.is_zipfile(filename))
    except pickle.UnpicklingError as err:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(
                filename)
        except Exception:  # not a zip/pickle file at all
            unsafe = None
        if unsafe:
            raise CheckpointLoadError(
                f'checkpoint {filename} pickles classes that are not on the '
                f'weights_only allow-list: {", ".join(unsafe)}. If you trust '
                'the file, allow them with mmcd.compat.'
                'allow_mmengine_checkpoint_globals(extra=[...]).') from None
        raise CheckpointLoadError(
            f'{filename} is not a PyTorch checkpoint '
            f'({_one_line_reason(err)})') from None
    except Exception as err:  # garbage fails in many ways inside torch.load
        raise CheckpointLoadError(
            f'{filename} is not a PyTorch checkpoint '
            f'({_one_line_reason(err)})') from None


def install() -> None:
    """Allow-list MMEngine's classes and make :func:`load_from_local_weights_only`
    the loader of local paths (MMEngine's ``''`` scheme)."""
    allow_mmengine_checkpoint_globals()
    CheckpointLoader.register_scheme(
        prefixes='', loader=load_from_local_weights_only, force=True)
