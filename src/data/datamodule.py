"""A LightningDataModule over prepared datasets: global batch in config, per-device batch here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from src.data.datasets import collate_list
from src.data.samplers import InferenceShardSampler, TrainShardSampler
from src.utils.logging import get_logger

log = get_logger(__name__)


class WSSSDataModule(pl.LightningDataModule):
    """Train / val / predict loaders with the rank-aware samplers of src.data.samplers.

    ``batch_size`` is the global training batch; each of N processes loads batch_size / N.
    Validation and prediction batches are lists of samples (images may differ in size) unless
    ``stack_eval`` is set.
    """

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        predict: Dataset | None = None,
        batch_size: int = 1,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        drop_last: bool = True,
        stack_eval: bool = False,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set, self.predict_set = train, val, predict
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.loader_kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
        if num_workers > 0:
            self.loader_kwargs["persistent_workers"] = persistent_workers
        self.seed, self.drop_last, self.stack_eval = seed, drop_last, stack_eval

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def per_device_batch(self) -> int:
        _, world = self._rank_world()
        if self.batch_size % world:
            log.warning(f"global batch {self.batch_size} is not divisible by {world} processes; "
                        f"each loads {max(1, self.batch_size // world)}")
        return max(1, self.batch_size // world)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        batch = self.per_device_batch()
        sampler = TrainShardSampler(len(self.train_set), self.seed, rank, world, global_batch=batch * world,
                                    drop_last=self.drop_last)
        if len(sampler) < batch and self.drop_last:
            raise ValueError(
                f"the training split has {len(self.train_set)} images, fewer than one batch of {self.batch_size}: "
                "lower the batch size or enlarge the split"
            )
        return DataLoader(self.train_set, batch_size=batch, sampler=sampler, drop_last=self.drop_last,
                          **self.loader_kwargs)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        rank, world = self._rank_world()
        collate: Callable | None = None if self.stack_eval else collate_list
        sampler = InferenceShardSampler(len(dataset), rank, world)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, collate_fn=collate,
                          **self.loader_kwargs)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.val_set) if self.val_set is not None else []

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_set)
