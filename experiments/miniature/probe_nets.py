"""Probe networks for the miniature's calibration (experiments/miniature/RESULTS.md): a plain GAP + 1x1
classifier over any trunk, so the trunk is compared alone (no SEAM head, no PCM)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.ops.optim import ParamGroup


class GAPClassifier(nn.Module):
    """trunk (forward -> features, ``out_channels``, ``output_stride``) -> GAP -> bias-free 1x1 classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int, classifier_lr_mult: float = 10.0) -> None:
        super().__init__()
        self.backbone, self.num_classes = backbone, num_classes
        self.output_stride = backbone.output_stride
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        self.classifier_lr_mult = classifier_lr_mult

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.backbone(x), 1)).flatten(1)

    def seed_cams(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup(self.backbone.parameters(), 1.0, name="backbone"),
                ParamGroup(self.classifier.parameters(), self.classifier_lr_mult, name="classifier")]
