"""Data samplers for calibration."""
from typing import Iterator, Sized

import torch
from mmengine.registry import DATA_SAMPLERS
from torch.utils.data import Sampler


@DATA_SAMPLERS.register_module()
class SameOnAllRanksSampler(Sampler):
    """A seeded random order of the whole dataset, the same on every rank.

    Calibration (PTQ, QAT initialisation) must see the same images on every
    process of a distributed run, or each rank calibrates its own quantizer
    ranges and evaluates (or trains) a different model; MMEngine's
    ``DefaultSampler`` gives each rank its own shard.
    """

    def __init__(self, dataset: Sized, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        return iter(torch.randperm(len(self.dataset),
                                   generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.dataset)
