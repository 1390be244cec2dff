"""CONTA's confounder set as a Lightning callback on the segmentation model's prediction.

For each foreground class i, c_i = the average of that class's masks over the training images whose
image-level labels contain class i (specs/conta.md), at a fixed h x w. Masks are accumulated as sums
and counts during ``trainer.predict`` and summed across DDP ranks at the end, so 1 and N processes
build the same C. Background has no entry (C holds the n foreground classes).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from src.utils import dist


class ConfounderSetCallback(pl.Callback):
    """Accumulates ``class_masks`` (n + 1, h, w) of each predicted image into per-class sums.

    The predict module returns, per image, (id, payload) with payload["class_masks"] (background first)
    and payload["labels"] (n image-level labels); after predict, :attr:`confounders` is C (n, h, w).
    """

    def __init__(self, num_classes: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.num_classes, self.size = num_classes, tuple(size)
        self.sums = torch.zeros(num_classes, *self.size, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.confounders: torch.Tensor | None = None

    def add(self, class_masks: torch.Tensor, labels: torch.Tensor) -> None:
        present = labels.bool().cpu()
        fg = class_masks[1:].detach().double().cpu()
        self.sums[present] += fg[present]
        self.counts += present.double()

    def on_predict_batch_end(self, trainer, pl_module, outputs: list[tuple[str, dict]] | None, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        for _, payload in outputs or []:
            self.add(torch.as_tensor(payload["class_masks"]), torch.as_tensor(payload["labels"]))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self.reduce()

    def reduce(self) -> torch.Tensor:
        """All-reduce the sums and counts and compute C (classes never seen stay 0)."""
        sums = dist.all_reduce_sum(self.sums.clone())
        counts = dist.all_reduce_sum(self.counts.clone())
        self.sums, self.counts = sums, counts
        self.confounders = (sums / counts.clamp(min=1).view(-1, 1, 1)).float()
        return self.confounders
