"""Training guards: stop on a non-finite loss, naming the step, with a debug checkpoint saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from src.callbacks.progress import stage_label


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard(pl.Callback):
    """After every training step: if the loss is not finite, save ``debug_step<N>.ckpt`` (the model as
    it was before this step's update went further) in ``<stage folder>/debug`` and stop the run with an
    error naming the stage."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or torch.isfinite(torch.as_tensor(loss)).all():
            return
        step = trainer.global_step
        path = Path(trainer.default_root_dir) / "debug" / f"debug_step{step}.ckpt"
        trainer.save_checkpoint(path)
        raise NonFiniteLossError(
            f"stage '{stage_label(trainer)}': non-finite training loss ({float(loss)}) at step {step} "
            f"(epoch {trainer.current_epoch}, batch {batch_idx}); debug checkpoint: {path}. "
            "Lower the learning rate (optim.lr) or check the inputs of this stage."
        )
