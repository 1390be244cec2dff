"""Helpers shared by the inference stages (seeds, IR labels, random walk, confounder set)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from src.callbacks.writer import PerImageWriter
from src.data.datamodule import WSSSDataModule
from src.data.datasets import WSSSDataset
from src.pipeline.stage import StageContext
from src.utils import dist


def same_size_groups(batch: list[dict]) -> list[list[dict]]:
    """Split a list batch into groups of equally sized images (each group runs as one tensor batch)."""
    groups: dict[tuple, list[dict]] = {}
    for sample in batch:
        groups.setdefault(tuple(sample["image"].shape), []).append(sample)
    return list(groups.values())


def pending_ids(ids: Sequence[str], folder: Path, suffix: str) -> list[str]:
    """Ids whose output file does not exist yet (resume after an interruption)."""
    folder = Path(folder)
    done = {p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")} if folder.is_dir() else set()
    return [i for i in ids if i not in done]


def run_predict(ctx: StageContext, module: pl.LightningModule, dataset: WSSSDataset,
                write: Callable[[str, Any], None], batch_size: int,
                callbacks: Sequence[pl.Callback] = ()) -> None:
    """trainer.predict over ``dataset`` with a per-image writer (each rank writes its own shard)."""
    if len(dataset) == 0 and not callbacks:
        dist.barrier()
        return
    trainer = ctx.make_trainer(callbacks=[PerImageWriter(write), *callbacks])
    dm = WSSSDataModule(predict=dataset, eval_batch_size=batch_size, **ctx.loader_kwargs())
    trainer.predict(module, datamodule=dm, return_predictions=False)
    dist.barrier()
