"""IRNet stage 4: train IRN (class boundaries + displacement) on the IR labels (specs/irnet.md).

Each training crop's IR label is sampled at stride 4 (pixels 4i+2, as the reference loader), pixel
pairs within ``radius`` become positive (same class / both background), negative (different classes)
or ignored (any end unknown), and the inter-pixel affinity + displacement losses are averaged over
the pairs of the whole batch (:func:`~src.ops.losses.irn_loss_terms`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from src.ops.losses import irn_loss_terms
from src.ops.path_index import PathIndex, affinity_labels
from src.stages.core import StageContext
from src.stages.training import PolySGDModule, RefinerTrainingStage
from src.utils.dist import global_mean_count

LABEL_STRIDE = 4
LABEL_OFFSET = 2  # the reference shrinks labels by nearest-neighbour sampling of pixels 4i + 2
LOGGED_TERMS = ("pos_aff", "neg_aff", "dp_fg", "dp_bg")


class IRNModule(PolySGDModule):
    def __init__(self, net: torch.nn.Module, radius: int, optim: Mapping[str, Any], max_steps: int) -> None:
        super().__init__(net, optim, max_steps)
        self.radius = radius
        self._path_index: dict[tuple[int, int], PathIndex] = {}

    def path_index(self, size: tuple[int, int]) -> PathIndex:
        if size not in self._path_index:
            self._path_index[size] = PathIndex(self.radius, size)
        return self._path_index[size]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        edge_logits, displacement = self.net(batch["image"])
        h, w = edge_logits.shape[-2:]
        labels = batch["mask"][:, LABEL_OFFSET::LABEL_STRIDE, LABEL_OFFSET::LABEL_STRIDE][:, :h, :w]
        index = self.path_index((h, w))
        bg_pos, fg_pos, neg = affinity_labels(labels, index)
        terms = irn_loss_terms(edge_logits, displacement, bg_pos, fg_pos, neg, index, count=global_mean_count)
        return self.log_losses(terms, LOGGED_TERMS, "total", edge_logits.shape[0])


class IRNStage(RefinerTrainingStage):
    """Trains IRN on the ``labels`` input's IR labels (conf/refinement/irn.yaml ``irn``); writes ``model.ckpt``."""

    def make_module(self, net: torch.nn.Module, max_steps: int, ctx: StageContext) -> IRNModule:
        return IRNModule(net, self.radius, self.optim, max_steps)
