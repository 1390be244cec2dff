"""DeepLab-v2 (Chen et al., TPAMI 2017; specs/deeplab.md): dilated ResNet + ASPP, multi-scale inputs.

ASPP (v2) = four parallel 3x3 atrous convolutions (rates 6, 12, 18, 24) from the last feature map
straight to the class logits, summed. MSC runs the net on the image at each of ``scales`` and adds a
fourth output, the element-wise max of all outputs upsampled to the first scale's size; in training
every output gets its own loss (:func:`msc_loss`), at test time the max is the prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.models.resnet import ResNet
from src.ops.optim import ParamGroup


class ASPP(nn.Module):
    """Sum of parallel dilated 3x3 convs (DeepLab-v2); weights N(0, 0.01), biases 0 as the reference."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(0)


class DeepLabV2(nn.Module):
    def __init__(self, backbone: ResNet, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.aspp = ASPP(backbone.out_channels, num_classes, rates)
        self.output_stride = backbone.output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the backbone's output stride (B, C, H/8, W/8 for output stride 8)."""
        return self.aspp(self.backbone(x))

    def param_groups(self, head_lr_mult: float, head_bias_lr_mult: float, head_bias_weight_decay: float
                     ) -> list[ParamGroup]:
        """Backbone 1x; ASPP weights ``head_lr_mult``x; ASPP biases ``head_bias_lr_mult``x with their own weight
        decay (the reference recipe: 10x, 20x and no weight decay; conf/segmentation/deeplab_v2.yaml)."""
        weights = [b.weight for b in self.aspp.branches]
        biases = [b.bias for b in self.aspp.branches]
        return [
            ParamGroup(self.backbone.parameters(), 1.0, name="backbone"),
            ParamGroup(weights, head_lr_mult, name="aspp_weight"),
            ParamGroup(biases, head_bias_lr_mult, weight_decay=head_bias_weight_decay, name="aspp_bias"),
        ]


def msc_forward(net: nn.Module, x: torch.Tensor, scales: Sequence[float]) -> list[torch.Tensor]:
    """Outputs at each scale plus their element-wise max (upsampled to the first scale's output size)."""
    outs = []
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        outs.append(net(xs))
    if len(outs) == 1:
        return outs
    size = outs[0].shape[-2:]
    ups = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
    return outs + [torch.stack(ups).amax(0)]


@torch.no_grad()
def predict_probs(net: nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False
                  ) -> torch.Tensor:
    """Class probabilities (B, C, H, W) at the input size: max over the scales' upsampled logits
    (DeepLab's test-time MSC), averaged with the mirror image's when ``flip``."""
    size = images.shape[-2:]

    def one(x: torch.Tensor) -> torch.Tensor:
        outs = msc_forward(net, x, scales)
        return F.interpolate(outs[-1], size=size, mode="bilinear", align_corners=False)

    logits = one(images)
    if flip:
        logits = (logits + one(images.flip(-1)).flip(-1)) / 2
    return torch.softmax(logits, 1)
