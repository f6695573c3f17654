"""What one reconstruction unit (or MLP) is trained on: its recorded inputs,
float output and sensitivity weights on the reconstruction images, held
chunk by chunk in memory or in a disk cache. Pure PyTorch.

The reconstruction images run through the model in chunks, one call of a
*run* per chunk (the engine's: a test step on ``chunk_images`` images), so
that no forward pass holds more than one chunk's activations. A chunk's
images share one padded size; chunks may differ, so they are never
concatenated: a mini-batch is drawn from one chunk (:meth:`UnitData.
sample`).

Per image a block unit keeps three tensors of its input's or output's size
(quantized-prefix input, float input, float output; a fourth, the
sensitivity weights, with the ``'aph'`` loss). For Mask R-CNN Swin-T at
800x1344 (padded), a stage-1 block's input is 200 x 336 tokens x 96
channels, 25.8 MB in float32: 77 MB per image, 20 GB for APHQ-ViT's 256
detection images. With ``cache_dir`` every chunk is written with
``torch.save`` as it is recorded and read back memory-mapped
(``torch.load(mmap=True)``): the operating system keeps in memory what
fits, and a mini-batch reads its rows. The files are deleted when the unit
is done.
"""
import os
import shutil
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .reconstruction_losses import flat_tensors

#: a run of the model on the reconstruction images (or on one chunk)
Run = Callable[[torch.nn.Module], object]


def as_runs(run) -> List:
    """``run`` as a list of per-chunk runs (one callable: one chunk)."""
    return list(run) if isinstance(run, (list, tuple)) else [run]


def rows(obj, index: torch.Tensor, size: int):
    """``obj`` (tensors with ``size`` rows, nested in tuples, lists and
    dicts) at the rows ``index``."""
    if isinstance(obj, torch.Tensor) and obj.dim() and obj.shape[0] == size:
        return obj[index]
    if isinstance(obj, dict):
        return {k: rows(v, index, size) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(rows(o, index, size) for o in obj)
    return obj


class UnitData:
    """One unit's recorded data, chunk by chunk (module docstring). Each
    chunk is a dict: ``fp`` (the float model's ``(args, kwargs)``), ``q``
    (the quantized prefix's, or None), ``target`` (the float output) and
    ``weight`` (sensitivity weights, or None); the first floating-point
    tensor of ``fp``'s arguments has one row per image."""

    def __init__(self, cache_dir: Optional[str] = None):
        self.chunks: List[Dict] = []
        self.sizes: List[int] = []
        self._dir = None if cache_dir is None else tempfile.mkdtemp(
            prefix='mmcd-recon-', dir=_made(cache_dir))

    def add(self, fp, target, q=None, weight=None) -> None:
        """Keep one chunk (in memory, or written to the cache and mapped
        back)."""
        chunk = dict(fp=fp, q=q, target=target, weight=weight)
        size = flat_tensors(fp[0])[0].shape[0]
        if self._dir is not None:
            path = os.path.join(self._dir, f'chunk{len(self.chunks)}.pt')
            torch.save(chunk, path)
            chunk = torch.load(path, mmap=True, weights_only=True)
        self.chunks.append(chunk)
        self.sizes.append(size)

    @property
    def size(self) -> int:
        """The number of images."""
        return sum(self.sizes)

    def __iter__(self) -> Iterator[Tuple[Dict, int]]:
        """``(chunk, number of its images)`` in recording order."""
        return iter(zip(self.chunks, self.sizes))

    def sample(self, batch_size: int, gen: torch.Generator) -> Dict:
        """A mini-batch: ``batch_size`` images drawn with replacement from
        one chunk, the chunk drawn in proportion to its images (one chunk:
        no draw, the rows as ``torch.randint(0, N, (batch_size, ))``)."""
        k = 0
        if len(self.chunks) > 1:
            k = int(torch.multinomial(
                torch.tensor(self.sizes, dtype=torch.float), 1,
                generator=gen))
        index = torch.randint(0, self.sizes[k], (batch_size, ), generator=gen)
        return rows(self.chunks[k], index, self.sizes[k])

    def in_turn(self, batch_size: int) -> Iterator[Dict]:
        """Mini-batches of consecutive images in recording order, cycling
        without end; a batch ends at the end of its chunk (so the last one
        of a chunk may be smaller)."""
        while True:
            for chunk, size in self:
                for start in range(0, size, batch_size):
                    yield rows(chunk, torch.arange(
                        start, min(start + batch_size, size)), size)

    def image(self, i: int) -> Dict:
        """The ``i``-th image (in recording order) as a chunk of one."""
        for chunk, size in self:
            if i < size:
                return rows(chunk, torch.tensor([i]), size)
            i -= size
        raise IndexError(f'image {i} of {self.size}')

    def __enter__(self) -> 'UnitData':
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Drop the data and delete the cache files."""
        self.chunks.clear()
        self.sizes.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _made(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path

