"""AffinityNet training (specs/seam.md; PSA/SEAM ``train_aff.py``) on the affinity labels.

Each training crop's full-resolution label map (class ids, 0 = confident background, 255 = unknown;
src/inference/affinity_labels.py) is pooled to the net's stride-8 grid inside the training step
(:func:`stride_labels`), pixel pairs within ``radius`` become background-positive, foreground-positive or
negative (:func:`~src.models.affinity.affinity_labels_in_radius`) and the AffinityNet loss
bg/4 + fg/4 + neg/2 is taken over the pairs of the whole batch (:func:`~src.models.affinity.affinity_loss`;
with N processes each rank divides by the global batch's pair counts / N, so 1 and N processes agree).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from src.data.voc import IGNORE
from src.models.affinity import affinity_labels_in_radius, affinity_loss, pair_affinity, to_label_layout
from src.pipeline.stage import StageContext
from src.stages.base import PolySGDModule, RefinerTrainingStage, load_trained_net
from src.utils.dist import global_mean_count

LOGGED_TERMS = ("bg_loss", "fg_loss", "neg_loss")


def stride_labels(mask: torch.Tensor, stride: int, num_classes: int) -> torch.Tensor:
    """Full-resolution label maps (B, H, W) -> labels (B, ceil(H/stride), ceil(W/stride)) on the net's grid.

    The reference pools the two CRF score maps (low / high alpha) of the crop ``stride`` x ``stride`` and
    takes their argmax: a cell is class c when c beats the low-alpha background, background when the
    high-alpha background beats every class, unknown otherwise. From the stored labels, per cell with
    fractions bg (0), fg_c (class c) and unk (255, padding included): the low-alpha map gives the
    unknown pixels to the background, so the cell is c if fg_c > bg + unk; the high-alpha map gives them
    to a class, so the cell is background if bg >= max_c fg_c + unk (ties go to the background, as the
    reference's argmax); else 255. Exact for hard (one-hot) CRF scores and cells holding one class.
    """
    b, h, w = mask.shape
    pad_h, pad_w = -h % stride, -w % stride
    values = torch.where((mask < 0) | (mask > num_classes), torch.full_like(mask, num_classes + 1), mask)
    values = F.pad(values, (0, pad_w, 0, pad_h), value=num_classes + 1)
    onehot = F.one_hot(values.long(), num_classes + 2).permute(0, 3, 1, 2).float()
    frac = F.avg_pool2d(onehot, stride, stride)
    bg, fg, unknown = frac[:, 0], frac[:, 1:num_classes + 1], frac[:, num_classes + 1]
    fg_max, fg_arg = fg.max(1)
    out = torch.where(fg_max > bg + unknown, fg_arg + 1, torch.full_like(fg_arg, IGNORE))
    return torch.where(bg >= fg_max + unknown, torch.zeros_like(out), out)


class AffinityModule(PolySGDModule):
    def __init__(self, net: torch.nn.Module, radius: int, num_classes: int, optim: Mapping[str, Any],
                 max_steps: int) -> None:
        super().__init__(net, optim, max_steps)
        self.radius, self.num_classes = radius, num_classes

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        features = self.net(batch["image"])
        h, w = features.shape[-2:]
        labels = stride_labels(batch["mask"], self.net.output_stride, self.num_classes)[:, :h, :w]
        bg_pos, fg_pos, neg = affinity_labels_in_radius(labels, self.radius)
        # fp32 under a bf16/fp16 autocast too: there exp(-d) of close features rounds to 1 and the negative
        # term -log(1 + 1e-5 - a) becomes inf
        aff = to_label_layout(pair_affinity(features.float(), self.radius), self.radius)
        terms = affinity_loss(aff, bg_pos, fg_pos, neg, count=global_mean_count)
        n = features.shape[0]
        for key in LOGGED_TERMS:
            self.log(f"train/{key}", terms[key], batch_size=n)
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=n)
        return terms["loss"]


def load_affinity(ctx: StageContext, role: str = "model", stage: str = "affinity") -> torch.nn.Module:
    """The trained AffinityNet of this round, in eval mode (for the random walk)."""
    return load_trained_net(ctx, stage, role)


class AffinityStage(RefinerTrainingStage):
    """Trains AffinityNet on ``labels`` (conf/refinement/affinity.yaml ``affinity``); writes ``model.ckpt``."""

    def labels_folder(self) -> str:
        from src.inference.affinity_labels import AffinityLabelStage

        return AffinityLabelStage.folder

    def make_module(self, net: torch.nn.Module, optim: dict, max_steps: int, ctx: StageContext) -> AffinityModule:
        return AffinityModule(net, self.radius, ctx.data.num_classes, optim, max_steps)
