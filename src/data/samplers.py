"""Samplers that shard a dataset across ranks the same way for 1 and N processes.

Training: one global permutation per (seed, epoch); with ``drop_last`` it is cut to whole global
batches (N // B * B images), otherwise padded to a multiple of the world size; rank r takes every
world-th index. With a per-rank batch of B / world, global batch b is the same set of images as in a
single-process run with batch B, and both run the same number of steps.
Inference: rank r takes indices r, r + world, ...: no padding, so no image is written or scored
twice and none is dropped.
Both yield (epoch, index) so the dataset can seed its augmentation from them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class TrainShardSampler(Sampler[tuple[int, int]]):
    def __init__(self, length: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 global_batch: int | None = None, drop_last: bool = False):
        if length < 1:
            raise ValueError("cannot train on an empty split")
        self.length, self.seed, self.rank, self.world, self.shuffle = length, seed, rank, world_size, shuffle
        self.epoch = 0
        self.used = length
        if drop_last and global_batch:
            self.used = (length // global_batch) * global_batch
            if self.used == 0:
                raise ValueError(f"the training split has {length} images, fewer than one batch of {global_batch}")
        self.per_rank = -(-self.used // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        order = order[: self.used]
        total = self.per_rank * self.world
        order += order[: total - len(order)]
        for i in order[self.rank::self.world]:
            yield (self.epoch, i)


class InferenceShardSampler(Sampler[tuple[int, int]]):
    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.length, self.rank, self.world = length, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in range(self.rank, self.length, self.world):
            yield (0, i)
