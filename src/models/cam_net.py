"""IRNet's CAM classifier: a ResNet trunk, global average pooling and a 1x1 classifier.

The class activation maps are the classifier applied at every position of the last feature map
(no pooling). ``detach_stage`` and ``freeze_stem`` reproduce IRNet's paper setting (stage-2 output
detached, conv1/bn1 frozen); the quick profile trains everything from scratch. CONTA's context
prior joins through :class:`~src.models.conta.ContextInjection` (a mixin, also used by SEAM's net).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.models.conta import ContextInjection
from src.models.resnet import ResNet
from src.ops.optim import ParamGroup


def trunk(backbone: ResNet, x: torch.Tensor, detach_stage: int | None) -> torch.Tensor:
    """stem -> layer1..4, cutting the graph after ``detach_stage`` (IRNet trains only the stages above it)."""
    x = backbone.stem(x)
    for i in range(1, 5):
        x = getattr(backbone, f"layer{i}")(x)
        if detach_stage is not None and i == detach_stage:
            x = x.detach()
    return x


class CAMNet(ContextInjection, nn.Module):
    first_class_channel = 0  # classifier output of class 1 (ReCAM's W_bce rows; SEAM's channel 0 is background)

    def __init__(
        self,
        backbone: ResNet,
        num_classes: int,
        detach_stage: int | None = None,
        freeze_stem: bool = False,
        classifier_bias: bool = False,
        classifier_lr_mult: float = 10.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.detach_stage = detach_stage
        self.classifier_lr_mult = classifier_lr_mult
        self.feature_channels = backbone.out_channels
        self.output_stride = backbone.output_stride
        self.classifier = nn.Conv2d(self.feature_channels, num_classes, 1, bias=classifier_bias)
        if freeze_stem:
            for p in [*backbone.conv1.parameters(), *backbone.bn1.parameters()]:
                p.requires_grad_(False)

    def features(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Last feature map (B, C, h, w), with CONTA's prior appended when given."""
        return self.inject_feature(trunk(self.backbone, self.inject_input(x, context), self.detach_stage), context)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Image-level logits (B, K): GAP over the whole canvas, then the 1x1 classifier."""
        f = self.features(x, context)
        return self.classifier(F.adaptive_avg_pool2d(f, 1)).flatten(1)

    def cams(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Raw class activation maps (B, K, h, w) (no ReLU: the seed step applies it)."""
        return self.classifier(self.features(x, context))

    def seed_cams(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The maps the seeds are made of (the seed stage's CAM rule): IRNet's raw CAMs."""
        return self.cams(x, context)

    def param_groups(self) -> list[ParamGroup]:
        return [
            ParamGroup(self.backbone.parameters(), 1.0, name="backbone"),
            ParamGroup(self.classifier.parameters(), self.classifier_lr_mult, name="classifier"),
        ]
