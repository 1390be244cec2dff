"""CONTA's confounder set as a Lightning callback on the segmentation model's prediction.

For each foreground class i, c_i = the average of that class's masks over the training images whose
image-level labels contain class i (specs/conta.md), at a fixed h x w. Masks are accumulated as sums
and counts (a torchmetrics state, summed across DDP ranks at the end), so 1 and N processes build the
same C. Background has no entry (C holds the n foreground classes).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import Metric

from src.utils import dist


class ClassMaskMean(Metric):
    """Per-class mean of the class masks of the images labelled with that class."""

    full_state_update = False

    def __init__(self, num_classes: int, size: tuple[int, int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sums", torch.zeros(num_classes, *size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, class_masks: torch.Tensor, labels: torch.Tensor) -> None:  # type: ignore[override]
        """``class_masks`` (n + 1, h, w) of one image (background first), ``labels`` its n image labels."""
        present = labels.bool().to(self.sums.device)
        fg = class_masks[1:].detach().double().to(self.sums.device)
        self.sums[present] += fg[present]
        self.counts += present.double()

    def compute(self) -> torch.Tensor:
        """C (n, h, w) float32 (classes never seen stay 0)."""
        return mean_of(self.sums, self.counts)


def mean_of(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return (sums / counts.clamp(min=1).view(-1, 1, 1)).float()


class ConfounderSetCallback(pl.Callback):
    """Accumulates ``class_masks`` (n + 1, h, w) of each predicted image into :class:`ClassMaskMean`.

    The predict module returns, per image, (id, payload) with payload["class_masks"] (background first)
    and payload["labels"] (n image-level labels); after predict, :attr:`confounders` is C (n, h, w) and
    :attr:`counts` the number of images per class, both summed over ranks.
    """

    def __init__(self, num_classes: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.num_classes, self.size = num_classes, tuple(size)
        self.mean = ClassMaskMean(num_classes, self.size)
        self.confounders: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def add(self, class_masks: torch.Tensor, labels: torch.Tensor) -> None:
        self.mean.update(class_masks, labels)

    def on_predict_batch_end(self, trainer, pl_module, outputs: list[tuple[str, dict]] | None, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        for _, payload in outputs or []:
            self.add(torch.as_tensor(payload["class_masks"]), torch.as_tensor(payload["labels"]))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self.reduce()

    def reduce(self) -> torch.Tensor:
        """Sum the states over ranks and compute C."""
        self.mean = self.mean.to(dist.reduce_device())
        with self.mean.sync_context():  # the summed states, restored to this rank's afterwards
            self.confounders = mean_of(self.mean.sums, self.mean.counts).cpu()
            self.counts = self.mean.counts.cpu().clone()
        return self.confounders
