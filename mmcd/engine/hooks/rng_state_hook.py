"""Bit-exact ``--resume``: every random stream the training step consumes is
in the checkpoint, and nothing outside training draws from it.

MMEngine 0.10.7 seeds once at start-up and saves no RNG state, so a resumed
run re-seeds and then draws different random numbers than the uninterrupted
run did (mmdet samples RoIs with the global torch RNG, augmentations use
numpy's and Python's, each DataLoader iterator draws its workers' base seed
from torch's). :class:`RNGStateHook` makes resumed == uninterrupted, bit for
bit, on the same hardware and world size:

* **In the checkpoint**: Python's, numpy's, torch's CPU and (when CUDA is
  initialised) every CUDA device's generator state, of every rank, as they
  were at the end of the training iteration or epoch the checkpoint belongs
  to. Restored at the resumed run's first ``before_train_epoch``, the point
  that corresponds to the save, and only when the run resumes exactly at
  that iteration (``load_from`` fine-tuning starts fresh streams).
* **Validation does not draw from training's streams**: the states are
  captured before a validation loop and put back after it, so the training
  trajectory does not depend on whether, or how often, validation runs (a
  resumed run has not run the validation that followed the checkpoint).
* **Workers re-seeded every epoch** from ``(seed, epoch, rank, worker)``:
  MMEngine's ``worker_init_fn`` gives every epoch the same worker seeds. The
  hook sets the loader's public ``worker_init_fn``, which every worker
  started afterwards runs: each epoch's in an epoch-based loop, those of a
  loader restart in an iteration-based one (whose first workers, started
  when the loop is built, keep MMEngine's seeds; a resumed iteration-based
  run replays the skipped batches through the same kind of workers, so
  their streams match too).

Persistent workers of an epoch-based loop would carry their random streams
across epochs, where a resumed run cannot follow, and restarting them needs
the DataLoader's private API (which left a deadlocked worker behind and
broke the iterator an iteration-based loop holds). ``tools/train.py``
therefore turns ``persistent_workers`` off for epoch-based training
(:func:`mmcd.utils.runner_setup.add_rng_state_hook`: the workers were
restarted each epoch anyway); a Runner built by hand with them on trains as
configured and the hook warns once that its resume is not bit-exact.

:func:`tools/train.py` adds the hook to every config that lacks it. A
checkpoint without RNG states (older, or written by another tool) resumes and
says once that the run will not be bit-exact; one from another world size
restores the ranks it has and says which ones it could not.
"""
import logging
import random
from functools import partial
from typing import Dict, List, Optional

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_dist_info
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop
from torch.utils.data import DataLoader

CHECKPOINT_KEY = 'rng_states'


def capture_rng_states() -> Dict:
    """This process's generator states, as objects a ``weights_only``
    checkpoint load accepts (tensors, ints, tuples)."""
    np_state = np.random.get_state(legacy=False)
    state = dict(
        python=random.getstate(),
        numpy=dict(key=torch.from_numpy(
            np_state['state']['key'].astype(np.int64)),
                   pos=int(np_state['state']['pos']),
                   has_gauss=int(np_state['has_gauss']),
                   gauss=float(np_state['gauss'])),
        torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: Dict) -> None:
    """Inverse of :func:`capture_rng_states`."""
    random.setstate(state['python'])
    np_state = state['numpy']
    np.random.set_state(dict(
        bit_generator='MT19937',
        state=dict(key=np_state['key'].numpy().astype(np.uint32),
                   pos=np_state['pos']),
        has_gauss=np_state['has_gauss'], gauss=np_state['gauss']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def seed_worker(worker_id: int, seed: int, epoch: int, rank: int) -> None:
    """``worker_init_fn`` that gives each (epoch, rank, worker) its own
    Python, numpy and torch seeds, independent of how the run got there."""
    worker_seed = int(np.random.SeedSequence(
        [seed, epoch, rank, worker_id]).generate_state(1)[0])
    random.seed(worker_seed)
    np.random.seed(worker_seed)
    torch.manual_seed(worker_seed)


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save every RNG state in checkpoints and restore it on ``--resume``,
    keep validation out of training's random streams, re-seed dataloader
    workers per epoch (module docstring: why each is needed).

    Highest priority: the states of all ranks are gathered before
    :class:`~mmengine.hooks.CheckpointHook` writes the checkpoint
    (``save_checkpoint`` runs on rank 0 only); they are restored at the
    first ``before_train_epoch`` of a resumed run, before any other hook
    draws from them, and after everything that only a resumed run does
    (``before_run``, ``before_train``).
    """

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._rank_states: Optional[List[Dict]] = None  # all ranks' states
        self._rank_states_iter = -1                     # ...at this iter
        self._paused: Optional[Dict] = None  # training's, during validation
        self._resume_states: Optional[Dict] = None  # from the checkpoint

    # ------------------------------------------------------- checkpoints --
    def _snapshot(self, runner) -> None:
        """Gather every rank's training-stream state for a checkpoint of
        the current iteration (collective: called on every rank)."""
        self._rank_states = all_gather_object(capture_rng_states())
        self._rank_states_iter = runner.iter

    def _checkpoint_due(self, runner, by_epoch: bool) -> bool:
        hooks = [h for h in runner.hooks if isinstance(h, CheckpointHook)]
        if not hooks:
            return False
        hook = hooks[0]
        if hook.by_epoch != by_epoch:
            return False
        if by_epoch:
            return (self.every_n_epochs(runner, hook.interval)
                    or self.is_last_train_epoch(runner))
        return (self.every_n_train_iters(runner, hook.interval)
                or self.is_last_train_iter(runner))

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if get_dist_info()[1] > 1 and self._checkpoint_due(runner, False):
            self._snapshot(runner)

    def after_train_epoch(self, runner) -> None:
        if get_dist_info()[1] > 1 and self._checkpoint_due(runner, True):
            self._snapshot(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if get_dist_info()[1] == 1:
            states = [self._paused or capture_rng_states()]
        elif self._rank_states_iter == runner.iter:
            states = self._rank_states
        else:
            print_log(f'RNGStateHook: no RNG states of all ranks at iteration '
                      f'{runner.iter}; this checkpoint will not resume '
                      'bit-exactly', logger='current', level=logging.WARNING)
            return
        # the iteration a run resumed from this checkpoint starts at: an
        # iteration-based loop saves before counting the finished iteration
        resume_iter = checkpoint.get('meta', {}).get('iter', runner.iter)
        checkpoint[CHECKPOINT_KEY] = dict(iter=resume_iter, ranks=states)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._resume_states = checkpoint.get(CHECKPOINT_KEY, {})

    def _restore_resumed(self, runner) -> None:
        saved, self._resume_states = self._resume_states, None
        if saved is None or runner.iter == 0:
            return  # a fresh run, or load_from (fine-tuning)
        if saved.get('iter') != runner.iter:
            print_log('RNGStateHook: the checkpoint has no RNG states of '
                      f'iteration {runner.iter} (an older checkpoint, or one '
                      'written without this hook): training resumes, but '
                      'not bit-exactly', logger='current',
                      level=logging.WARNING)
            return
        rank, world_size = get_dist_info()
        ranks = saved['ranks']
        if len(ranks) != world_size:
            restored = min(len(ranks), world_size)
            print_log(
                f'RNGStateHook: the checkpoint holds the RNG states of '
                f'{len(ranks)} rank(s), this run has {world_size}: ranks '
                f'0..{restored - 1} get theirs, '
                + ('the others keep their seeded streams; '
                   if world_size > restored else '')
                + 'the run is not bit-exact (the data is split differently)',
                logger='current', level=logging.WARNING)
        if rank < len(ranks):
            restore_rng_states(ranks[rank])

    # -------------------------------------------------------- validation --
    def before_val(self, runner) -> None:
        self._paused = capture_rng_states()

    def after_val(self, runner) -> None:
        if self._paused is not None:
            restore_rng_states(self._paused)
            self._paused = None

    # ----------------------------------------------------------- workers --
    def before_train(self, runner) -> None:
        loader = runner.train_dataloader
        if (isinstance(runner.train_loop, EpochBasedTrainLoop)
                and isinstance(loader, DataLoader) and loader.num_workers
                and loader.persistent_workers):
            print_log(
                'RNGStateHook: persistent dataloader workers carry their '
                'random streams across epochs, so a resumed run will not be '
                'bit-exact; set train_dataloader.persistent_workers=False '
                '(tools/train.py does)', logger='current',
                level=logging.WARNING)

    def before_train_epoch(self, runner) -> None:
        self._restore_resumed(runner)
        loader = runner.train_dataloader
        if isinstance(loader, DataLoader) and loader.num_workers:
            loader.worker_init_fn = partial(seed_worker, seed=runner.seed,
                                            epoch=runner.epoch,
                                            rank=get_dist_info()[0])
