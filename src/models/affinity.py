"""AffinityNet (Ahn & Kwak, CVPR 2018) on ResNet-38d, as used by SEAM (specs/seam.md).

The net maps an image to a 448-channel stride-8 feature map (b4/b5/b7 features -> 1x1 convs to
64/128/256 channels with ELU, concatenated, 1x1 conv 448 -> 448 with ELU, as ``network/resnet38_aff.py``);
the affinity of two pixels within the radius is exp(-mean_c |f_i - f_j|).

Pair layouts:
* :func:`pair_affinity` gives the project's layout (src/ops/pairs.py): (B, n_offsets, h, w),
  0 where the partner lies outside the image. The random walk reads this one.
* Training labels follow PSA's ``ExtractAffinityLabelInRadius``: only source pixels in the region
  rows [0, h - r + 1) x cols [r - 1, w - r + 1) (every partner inside), flattened row-major:
  (B, n_offsets, n_src). :func:`src.ops.pairs.to_label_layout` cuts the affinities to that layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.models.resnet38d import (
    LR_MULTS,
    PAPER_FROZEN_BLOCKS,
    ResNet38d,
    from_reference_keys,
    load_state_strict,
    read_state_dict,
    split_param_groups,
)
from src.ops.optim import ParamGroup
from src.ops.pairs import half_plane_offsets


class AffinityNet(nn.Module):
    """ResNet-38d + the AffinityNet feature head. ``forward`` returns the (B, 448, h, w) features;
    :meth:`affinity` the pair affinities in the project's layout."""

    def __init__(
        self,
        backbone: ResNet38d,
        freeze_stem: bool = True,  # specs/seam.md: conv1a, b2, b2_1, b2_2 frozen in the reference
        proj_channels: tuple[int, int, int] = (64, 128, 256),  # reference f8_3 / f8_4 / f8_5
        lr_mults: Sequence[float] = LR_MULTS,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.lr_mults = tuple(lr_mults)
        fc = backbone.feature_channels
        self.f8_3 = nn.Conv2d(fc["conv4"], proj_channels[0], 1, bias=False)
        self.f8_4 = nn.Conv2d(fc["conv5"], proj_channels[1], 1, bias=False)
        self.f8_5 = nn.Conv2d(fc["conv6"], proj_channels[2], 1, bias=False)
        self.out_channels = sum(proj_channels)
        self.f9 = nn.Conv2d(self.out_channels, self.out_channels, 1, bias=False)
        for conv in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)
        self.output_stride = backbone.output_stride
        if freeze_stem:
            backbone.freeze(PAPER_FROZEN_BLOCKS)

    def new_layers(self) -> list[nn.Module]:
        return [self.f8_3, self.f8_4, self.f8_5, self.f9]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.backbone.forward_features(x)
        f = torch.cat([F.elu(self.f8_3(d["conv4"])), F.elu(self.f8_4(d["conv5"])),
                       F.elu(self.f8_5(d["conv6"]))], 1)
        return F.elu(self.f9(f))

    def affinity(self, x: torch.Tensor, radius: int) -> torch.Tensor:
        return pair_affinity(self(x), radius)

    def param_groups(self) -> list[ParamGroup]:
        """Reference groups: backbone weights 1x / biases 2x (no wd), new layers (f8_3..f9) 10x / 20x."""
        return split_param_groups(self.backbone, self.new_layers(), self.lr_mults)

    def load_weights(self, path: str | Path) -> None:
        """Load a whole AffinityNet state strictly: ours or a reference ``resnet38_aff.pth``."""
        load_state_strict(self, from_reference_keys(read_state_dict(path)), source=str(path))


def pair_affinity(features: torch.Tensor, radius: int) -> torch.Tensor:
    """exp(-mean_c |f(y, x) - f(y + dy, x + dx)|) for every half-plane offset of ``radius``:
    (B, n_offsets, h, w), 0 where the partner lies outside the map."""
    b, _, h, w = features.shape
    out = []
    for dy, dx in half_plane_offsets(radius):
        x0, x1, y1 = max(0, -dx), w - max(0, dx), h - dy
        if y1 <= 0 or x1 <= x0:
            out.append(features.new_zeros(b, h, w))
            continue
        src = features[:, :, :y1, x0:x1]
        dst = features[:, :, dy:, x0 + dx:x1 + dx]
        aff = torch.exp(-(src - dst).abs().mean(1))
        out.append(F.pad(aff, (x0, w - x1, 0, h - y1)))
    return torch.stack(out, 1)
