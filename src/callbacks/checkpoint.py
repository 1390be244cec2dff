"""Checkpoints of the training stages: in the stage's own folder, written atomically.

``StageCheckpoint`` keeps ``<stage folder>/checkpoints/last.ckpt`` after every epoch (what an interrupted
run resumes from) whatever logger is set (Lightning would put it under the logger's folder);
``AtomicCheckpointIO`` writes every checkpoint to a temporary file and renames it, so a killed run never
leaves half a file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from src.utils.io import write_bytes_atomic


class StageCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_epochs`` in ``<trainer.default_root_dir>/checkpoints``."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        super().__init__(save_last=True, save_top_k=0, every_n_epochs=every_n_epochs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        super().setup(trainer, pl_module, stage)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes_atomic(Path(path), buffer.getvalue())
