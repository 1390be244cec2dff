"""AffinityNet training (specs/seam.md; PSA/SEAM ``train_aff.py``) on the affinity labels.

Each training crop's full-resolution label map (class ids, 0 = confident background, 255 = unknown) is
pooled to the net's stride-8 grid inside the training step (:func:`~src.ops.labels.stride_labels`), pixel
pairs within ``radius`` become background-positive, foreground-positive or negative
(:func:`~src.ops.pairs.affinity_labels_in_radius`) and the AffinityNet loss bg/4 + fg/4 + neg/2 is taken
over the pairs of the whole batch (:func:`~src.ops.losses.affinity_loss`; with N processes each rank
divides by the global batch's pair counts / N, so 1 and N processes agree). ``padding``: how the crop's
padding (label :data:`~src.ops.labels.NO_VOTE`) votes in the pooling (``no_vote``: not at all, the
reference's zero-padded scores; ``unknown``: as 255).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from src.models.affinity import pair_affinity
from src.ops.labels import NO_VOTE, PADDINGS, stride_labels
from src.ops.losses import affinity_loss
from src.ops.pairs import affinity_labels_in_radius, to_label_layout
from src.stages.core import StageContext
from src.stages.training import PolySGDModule, RefinerTrainingStage
from src.utils.config import check_choice
from src.utils.dist import global_mean_count

LOGGED_TERMS = ("bg_loss", "fg_loss", "neg_loss")


class AffinityModule(PolySGDModule):
    def __init__(self, net: torch.nn.Module, radius: int, num_classes: int, optim: Mapping[str, Any],
                 max_steps: int, padding: str = "unknown") -> None:
        super().__init__(net, optim, max_steps)
        self.radius, self.num_classes, self.padding = radius, num_classes, padding

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        features = self.net(batch["image"])
        h, w = features.shape[-2:]
        labels = stride_labels(batch["mask"], self.net.output_stride, self.num_classes, self.padding)[:, :h, :w]
        bg_pos, fg_pos, neg = affinity_labels_in_radius(labels, self.radius)
        # fp32 under a bf16/fp16 autocast too: there exp(-d) of close features rounds to 1 and the negative
        # term -log(1 + 1e-5 - a) becomes inf
        aff = to_label_layout(pair_affinity(features.float(), self.radius), self.radius)
        terms = affinity_loss(aff, bg_pos, fg_pos, neg, count=global_mean_count)
        return self.log_losses(terms, LOGGED_TERMS, "loss", features.shape[0])


class AffinityStage(RefinerTrainingStage):
    """Trains AffinityNet on the ``labels`` input (conf/refinement/affinity.yaml ``affinity``)."""

    def __init__(self, net: DictConfig, radius: int, epochs: int, batch_size: int, optim: DictConfig,
                 augment: list, padding: str, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(net, radius, epochs, batch_size, optim, augment, inputs)
        check_choice("padding", padding, PADDINGS)
        fills = [step.get("fill_mask") if isinstance(step, Mapping) else getattr(step, "fill_mask", None)
                 for step in augment]
        fills = [fill for fill in fills if fill is not None]
        if padding == "no_vote" and any(fill != NO_VOTE for fill in fills):
            raise ValueError(f"padding=no_vote reads the crop padding as label {NO_VOTE} (src.ops.labels.NO_VOTE); "
                             f"the augmentation pads the labels with fill_mask={fills}: set it to {NO_VOTE}")
        self.padding = padding

    def make_module(self, net: torch.nn.Module, max_steps: int, ctx: StageContext) -> AffinityModule:
        return AffinityModule(net, self.radius, ctx.data.num_classes, self.optim, max_steps, self.padding)
