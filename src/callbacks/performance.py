"""Speed options applied to every stage's network (conf: ``performance.*``).

``channels_last`` puts the network (and each training batch's images) in NHWC memory format, which
tensor cores prefer under mixed precision; ``compile`` runs ``torch.compile`` on the network in place
(``nn.Module.compile``: parameter names, hence checkpoints, are unchanged). Neither changes results beyond
float rounding, so neither is part of a stage's fingerprint.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from src.utils.logging import get_logger

log = get_logger(__name__)


class ModelPerformance(pl.Callback):
    def __init__(self, channels_last: bool = False, compile: bool = False) -> None:
        super().__init__()
        self.channels_last, self.compile = channels_last, compile

    def setup(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule, stage: str) -> None:
        if self.channels_last and trainer is not None and trainer.strategy.root_device.type == "cpu":
            # torch 2.13's oneDNN CPU backward of some channels_last 1x1 stride-2 convs aborts the process
            # (seen with the quick profile's ResNet-38d; experiments/BENCHMARKS.md): NHWC is a GPU option.
            log.warning("performance.channels_last is ignored on the CPU")
            self.channels_last = False
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
        net = getattr(pl_module, "net", None)
        if self.compile and isinstance(net, torch.nn.Module) and not getattr(net, "_wsss_compiled", False):
            net.compile()
            net._wsss_compiled = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.channels_last and isinstance(batch, dict) and torch.is_tensor(batch.get("image")) \
                and batch["image"].dim() == 4:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
