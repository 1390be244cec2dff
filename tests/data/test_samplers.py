"""Rank-aware samplers (src/data/samplers.py) and the DataModule's per-device batch
(src/data/datamodule.py): 1 and N processes see the same global batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from src.data.datamodule import WSSSDataModule
from src.data.samplers import InferenceShardSampler, TrainShardSampler


def batches(sampler, batch: int, drop_last: bool = True) -> list[list[int]]:
    """The index batches a DataLoader(batch_size=batch, drop_last=drop_last) would form."""
    items = list(sampler)
    assert all(epoch == sampler.epoch for epoch, _ in items)
    idx = [i for _, i in items]
    out = [idx[k:k + batch] for k in range(0, len(idx), batch)]
    return [b for b in out if len(b) == batch] if drop_last else out


def global_batches(n: int, batch: int, world: int, epoch: int, seed: int = 3) -> list[list[int]]:
    """Batch b of an N-process run: the union over ranks of each rank's batch b (batch / world each)."""
    per_rank = []
    for rank in range(world):
        s = TrainShardSampler(n, seed=seed, rank=rank, world_size=world, global_batch=batch, drop_last=True)
        s.set_epoch(epoch)
        per_rank.append(batches(s, batch // world))
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of steps
    return [sorted(sum((rb[b] for rb in per_rank), [])) for b in range(len(per_rank[0]))]


@pytest.mark.parametrize(("n", "batch", "world"), [(24, 6, 2), (24, 6, 3), (25, 6, 2), (23, 6, 3), (20, 4, 2)])
@pytest.mark.parametrize("epoch", [0, 1])
def test_union_over_ranks_equals_the_single_process_batch(n, batch, world, epoch):
    single = [sorted(b) for b in global_batches(n, batch, 1, epoch)]
    multi = global_batches(n, batch, world, epoch)
    common = min(len(single), len(multi))
    assert common >= 3
    assert multi[:common] == single[:common]


@pytest.mark.parametrize(("n", "batch", "world"), [(7, 4, 2), (11, 6, 3)])
def test_same_number_of_steps_for_1_and_n_processes(n, batch, world):
    assert len(global_batches(n, batch, world, 0)) == len(global_batches(n, batch, 1, 0))


def test_epochs_and_seeds_change_the_order():
    def order(epoch, seed=0):
        s = TrainShardSampler(30, seed=seed)
        s.set_epoch(epoch)
        return [i for _, i in s]

    assert order(0) == order(0)
    assert order(0) != order(1) and order(1) != order(2)
    assert order(0) != order(0, seed=1)
    assert sorted(order(1)) == list(range(30))
    s = TrainShardSampler(30, seed=0)
    s.set_epoch(4)
    assert {e for e, _ in s} == {4}  # the epoch travels with the index (augmentation seed)
    unshuffled = TrainShardSampler(5, shuffle=False, rank=1, world_size=2)
    assert [i for _, i in unshuffled] == [1, 3, 0]  # padded with the first index


def test_train_sampler_pads_when_not_divisible():
    n, world = 10, 3
    samplers = [TrainShardSampler(n, seed=1, rank=r, world_size=world) for r in range(world)]
    assert [len(s) for s in samplers] == [4, 4, 4]
    per_rank = [[i for _, i in s] for s in samplers]
    assert all(len(p) == 4 for p in per_rank)
    everything = sum(per_rank, [])
    assert set(everything) == set(range(n))  # nothing dropped
    assert len(everything) - len(set(everything)) == 2  # 12 slots: two padding repeats
    # the repeats are the first indices of the permutation (DistributedSampler's rule)
    full = [i for _, i in TrainShardSampler(n, seed=1)]
    interleaved = [per_rank[k % world][k // world] for k in range(12)]
    assert interleaved == full + full[:2]
    with pytest.raises(ValueError, match="empty"):
        TrainShardSampler(0)


@pytest.mark.parametrize(("n", "world"), [(10, 3), (7, 2), (2, 3), (9, 3)])
def test_inference_sampler_no_duplicates_no_drops(n, world):
    shards = [[i for _, i in InferenceShardSampler(n, r, world)] for r in range(world)]
    assert [len(InferenceShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]
    flat = sum(shards, [])
    assert sorted(flat) == list(range(n))
    assert shards[0] == list(range(0, n, world))


class Indexed(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        epoch, index = key
        return {"index": index, "image": torch.full((1,), float(index))}


def with_trainer(dm: WSSSDataModule, rank: int, world: int) -> WSSSDataModule:
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    return dm


def test_datamodule_per_device_batch_and_shards():
    dm = WSSSDataModule(train=Indexed(13), val=Indexed(5), predict=Indexed(5), batch_size=6, seed=2)
    assert dm.per_device_batch() == 6  # no trainer: one process
    loader = dm.train_dataloader()
    assert loader.batch_size == 6 and len(loader) == 2
    single = [sorted(b["index"].tolist()) for b in loader]

    union = None
    for rank in range(2):
        loader = with_trainer(WSSSDataModule(train=Indexed(13), batch_size=6, seed=2), rank, 2).train_dataloader()
        assert loader.batch_size == 3
        got = [b["index"].tolist() for b in loader]
        union = got if union is None else [a + b for a, b in zip(union, got)]
    assert [sorted(b) for b in union][:2] == single

    val = [with_trainer(WSSSDataModule(val=Indexed(5)), r, 2).val_dataloader() for r in range(2)]
    ids = [s["index"] for loader in val for batch in loader for s in batch]  # list batches (collate_list)
    assert sorted(ids) == [0, 1, 2, 3, 4]
    assert WSSSDataModule().val_dataloader() == []
    stacked = WSSSDataModule(predict=Indexed(5), eval_batch_size=2, stack_eval=True).predict_dataloader()
    assert [b["index"].tolist() for b in stacked] == [[0, 1], [2, 3], [4]]


def test_datamodule_batch_not_divisible_and_too_small_split():
    dm = with_trainer(WSSSDataModule(train=Indexed(20), batch_size=5), 0, 2)
    assert dm.per_device_batch() == 2
    assert with_trainer(WSSSDataModule(train=Indexed(20), batch_size=1), 0, 4).per_device_batch() == 1
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        WSSSDataModule(train=Indexed(5), batch_size=8).train_dataloader()
