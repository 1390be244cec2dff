"""IRNet's inter-pixel relation network (IRN): class-boundary and displacement branches on a ResNet.

Spec stage 4 (reference ``net/resnet50_irn.py``): the five backbone stage outputs feed

* a boundary branch: per stage a 1x1 conv (no bias) -> GroupNorm -> upsample to stride 4 -> ReLU,
  cropped to the stride-4 size, concatenated and fused by a 1x1 conv with bias to one logit channel;
* a displacement branch: stages 3-5 fused at stride 8, upsampled to stride 4, fused with stages 1-2 and
  mapped to a 2-channel displacement field, followed by a mean-shift (``MeanShift``).

Channel counts come from ``backbone.stage_channels`` and up-sampling factors from the backbone's
stage strides, so the same module runs on ResNet-50 and on the tiny CPU ResNet. Its loss is
:func:`src.ops.losses.irn_loss_terms`; the inference helpers here reproduce ``EdgeDisplacement`` (flip
merging of the boundary logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.models.resnet import ResNet
from src.ops.optim import ParamGroup

# Reference branch widths (net/resnet50_irn.py): 32 channels per boundary stage (5 x 32 = 160 fused),
# displacement 64/128/256/256/256 per stage and 256 in the two fusion layers.
EDGE_WIDTH = 32
EDGE_GROUPS = 4
DP_WIDTHS = (64, 128, 256, 256, 256)
DP_GROUPS = (8, 16, 16, 16, 16)
DP_FUSE_WIDTH = 256
DP_FUSE_GROUPS = 16
# Spec stage 5: the IRN runs at output stride 4 and inference pads images to the 512 training crop.
IRN_STRIDE = 4
INFER_CROP = 512


def stage_strides(backbone: ResNet) -> list[int]:
    """Cumulative strides of the five stage outputs of ``backbone`` (IRNet's ResNet-50: 4, 4, 8, 16, 16).

    Read from the modules (conv1 and maxpool strides, and each layer's downsample stride, which exists
    whenever a layer changes resolution) so custom ``strides`` arguments are honoured."""
    stride = backbone.conv1.stride[0] * int(backbone.maxpool.stride)
    strides = [stride]
    for i in range(1, 5):
        first = getattr(backbone, f"layer{i}")[0]
        if first.downsample is not None:
            stride *= first.downsample[0].stride[0]
        strides.append(stride)
    return strides


def _branch(in_ch: int, out_ch: int, groups: int, scale: int) -> nn.Sequential:
    """1x1 conv (no bias) -> GroupNorm -> [bilinear x scale] -> ReLU, the reference's building block."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.GroupNorm(groups, out_ch)]
    if scale > 1:
        layers.append(nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _ratio(fine: int, coarse: int) -> int:
    if coarse % fine:
        raise ValueError(f"IRN needs stage strides that are multiples of each other, got {fine} and {coarse}")
    return coarse // fine


class MeanShift(nn.Module):
    """Subtracts ``running_mean`` from the displacement field at evaluation time (identity in training);
    the reference sets the buffer after training to the mean displacement over the training images."""

    def __init__(self, num_features: int = 2) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x
        return x - self.running_mean.view(1, -1, 1, 1)


class IRN(nn.Module):
    """Boundary + displacement network on a ResNet whose stage 2 output (layer1) has stride 4.

    ``freeze_backbone=True`` is the paper setting: the backbone gets no gradient, its five stage outputs
    are detached (computed without autograd) and it stays in eval mode even in ``train()``.
    ``freeze_backbone=False`` trains the backbone with the branches (quick profile, from scratch).
    """

    def __init__(
        self,
        backbone: ResNet,
        freeze_backbone: bool = True,
        edge_width: int = EDGE_WIDTH,
        edge_groups: int = EDGE_GROUPS,
        dp_widths: Sequence[int] = DP_WIDTHS,
        dp_groups: Sequence[int] = DP_GROUPS,
        dp_fuse_width: int = DP_FUSE_WIDTH,
        dp_fuse_groups: int = DP_FUSE_GROUPS,
        edge_lr_mult: float = 1.0,
        dp_lr_mult: float = 1.0,
        backbone_lr_mult: float = 1.0,
    ) -> None:
        super().__init__()
        channels = list(backbone.stage_channels)
        strides = stage_strides(backbone)
        if len(channels) != 5 or len(dp_widths) != 5 or len(dp_groups) != 5:
            raise ValueError("IRN needs five backbone stages and five displacement widths/groups")
        if strides[0] != strides[1]:
            raise ValueError(f"IRN needs the stem and layer1 at the same stride, got strides {strides}")
        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        self.edge_lr_mult, self.dp_lr_mult, self.backbone_lr_mult = edge_lr_mult, dp_lr_mult, backbone_lr_mult
        self.output_stride = strides[1]

        self.edge_stages = nn.ModuleList(
            _branch(c, edge_width, edge_groups, _ratio(strides[1], s)) for c, s in zip(channels, strides)
        )
        self.edge_fuse = nn.Conv2d(5 * edge_width, 1, 1, bias=True)

        # Stages 1-2 stay at stride 4, stages 3-5 are brought to stage 3's stride, fused, then upsampled.
        mid = strides[2]
        self.dp_stages = nn.ModuleList(
            _branch(c, w, g, _ratio(mid, s) if i >= 2 else 1)
            for i, (c, w, g, s) in enumerate(zip(channels, dp_widths, dp_groups, strides))
        )
        self.dp_mid_fuse = _branch(sum(dp_widths[2:]), dp_fuse_width, dp_fuse_groups, _ratio(strides[1], mid))
        self.mean_shift = MeanShift(2)
        self.dp_out = nn.Sequential(
            nn.Conv2d(dp_widths[0] + dp_widths[1] + dp_fuse_width, dp_fuse_width, 1, bias=False),
            nn.GroupNorm(dp_fuse_groups, dp_fuse_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(dp_fuse_width, 2, 1, bias=False),
            self.mean_shift,
        )

        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> IRN:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.freeze_backbone:
            with torch.no_grad():
                return [f.detach() for f in self.backbone.forward_stages(x)]
        return self.backbone.forward_stages(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(edge logits (B, 1, h4, w4), displacement (B, 2, h4, w4)) at layer1's stride-4 size."""
        feats = self._stages(x)
        h, w = feats[1].shape[-2:]
        edges = [branch(f)[..., :h, :w] for branch, f in zip(self.edge_stages, feats)]
        edge_logits = self.edge_fuse(torch.cat(edges, dim=1))

        dps = [branch(f) for branch, f in zip(self.dp_stages, feats)]
        hm, wm = dps[2].shape[-2:]
        mid = self.dp_mid_fuse(torch.cat([d[..., :hm, :wm] for d in dps[2:]], dim=1))[..., :h, :w]
        displacement = self.dp_out(torch.cat([dps[0], dps[1], mid], dim=1))
        return edge_logits, displacement

    def edge_parameters(self) -> list[nn.Parameter]:
        return [*self.edge_stages.parameters(), *self.edge_fuse.parameters()]

    def displacement_parameters(self) -> list[nn.Parameter]:
        return [*self.dp_stages.parameters(), *self.dp_mid_fuse.parameters(), *self.dp_out.parameters()]

    def param_groups(self) -> list[ParamGroup]:
        """Edge branch and displacement branch at their lr multipliers (the reference: 1x and 10x, set in
        conf/refinement/irn.yaml), plus the backbone when it trains."""
        groups = [
            ParamGroup(self.edge_parameters(), lr_mult=self.edge_lr_mult, name="edge"),
            ParamGroup(self.displacement_parameters(), lr_mult=self.dp_lr_mult, name="displacement"),
        ]
        if not self.freeze_backbone:
            groups.append(ParamGroup(list(self.backbone.parameters()), lr_mult=self.backbone_lr_mult,
                                     name="backbone"))
        return groups


# ----------------------------------------------------------------------------------------- inference


def feature_size(image_size: tuple[int, int], stride: int = IRN_STRIDE) -> tuple[int, int]:
    """Size of the stride-``stride`` map of an (H, W) image: ((H-1)//stride + 1, (W-1)//stride + 1)."""
    return (int(image_size[0]) - 1) // stride + 1, (int(image_size[1]) - 1) // stride + 1


def pad_to_crop(images: torch.Tensor, crop_size: int | tuple[int, int] = INFER_CROP) -> torch.Tensor:
    """Zero-pad (B, C, H, W) images at the bottom/right to the training crop size (reference
    ``EdgeDisplacement``): the network then sees the same canvas size, with zero padding, as in training."""
    ch, cw = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    h, w = images.shape[-2:]
    if h > ch or w > cw:
        raise ValueError(f"image {h} x {w} is larger than the crop {ch} x {cw} it must be padded to")
    return F.pad(images, [0, cw - w, 0, ch - h])


def merge_flip_edge(edge_logits: torch.Tensor, displacement: torch.Tensor, image_size: tuple[int, int],
                    stride: int = IRN_STRIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``EdgeDisplacement`` post-processing of the IRN outputs for the batch [image, flipped image]
    (padded at the bottom/right): crop both outputs to the image's stride-4 size BEFORE flipping back
    (the padding sits on the right of the flipped image too, so the crop must come first), then
    edge = sigmoid(mean of the two logits) and displacement from the unflipped image only.

    Returns (edge (1, h, w), displacement (2, h, w))."""
    if edge_logits.shape[0] != 2 or displacement.shape[0] != 2:
        raise ValueError("merge_flip_edge expects the outputs of the batch [image, flipped image]")
    h, w = feature_size(image_size, stride)
    edge_logits = edge_logits[..., :h, :w]
    edge = torch.sigmoid(edge_logits[0] / 2 + edge_logits[1].flip(-1) / 2)
    return edge, displacement[0, :, :h, :w]


@torch.no_grad()
def infer_edge_displacement(model: IRN, image: torch.Tensor, crop_size: int | tuple[int, int] = INFER_CROP
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundary map and displacement of one normalised image (3, H, W) (or (1, 3, H, W)) with flip
    merging, as the reference ``make_sem_seg_labels`` computes them: (1, h, w), (2, h, w)."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError("infer_edge_displacement takes one image")
        image = image[0]
    batch = pad_to_crop(torch.stack([image, image.flip(-1)]), crop_size)
    edge_logits, displacement = model(batch)
    return merge_flip_edge(edge_logits, displacement, tuple(image.shape[-2:]), model.output_stride)
