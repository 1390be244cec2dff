"""SEAM (Wang et al., CVPR 2020): a ResNet-38d CAM network with a pixel correlation module (PCM), trained
as a siamese pair (crop and crop rescaled by 0.3) with equivariance losses. See specs/seam.md.

Everything follows the public code (``network/resnet38_SEAM.py``, ``train_SEAM.py``). Where the code does
more than, or other than, the paper describes:

* PCM input: the paper describes the PCM as refining the original CAM; the code feeds a no-grad normalised
  CAM (:func:`pcm_seed`: ReLU, divided by its spatial max, background = 1 - max foreground, non-maximal
  foreground scores zeroed) and detached b4/b5 features, so the PCM-side losses train the PCM layers only.
* Loss-side CAMs are max-min normalised per image and class (:func:`max_norm`) and multiplied by the
  image labels (background label 1) before L_ER and L_ECR; the paper writes plain L1 distances.
* L_ECR: the paper compares the PCM-refined CAM of one branch with the raw CAM of the other; the code
  compares it with the *one-hot* (argmax over foreground, background = 1 - max) of the other branch's
  normalised, masked CAM, detached, and averages only the top 20 % absolute errors per image (over all
  channels, at the rescaled branch's size).
* A background min-pooling term on each branch's PCM CAM, not described in the paper (the code's comment:
  it leaves the best score unchanged but moves the best background threshold), joins the total:
  (cls1 + cls2) / 2 + (minpool1 + minpool2) / 2 + L_ER + L_ECR1 + L_ECR2.
* L_cls is the multi-label soft margin of the global average of the CAM *upsampled to the input size*.
* ``tool/visualization.max_norm`` also has a numpy branch with other arithmetic (divides by max + e
  instead of max - min + e, mutates its argument). The reference uses it only for TensorBoard pictures
  (``generate_vis(norm=True)``, never called with norm=True in training), so it is not part of this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.models.conta import ContextInjection
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

EPS = 1e-5  # the reference's epsilon in every normalisation below


# ------------------------------------------------------------------------------------------- network


class SEAM(ContextInjection, nn.Module):
    """ResNet-38d -> Dropout2d -> 1x1 conv to ``num_classes + 1`` maps (channel 0 = background, no bias),
    plus the PCM (b4/b5 features -> 1x1 convs to 64/128 + ReLU, image resized to the feature size,
    1x1 conv 195 -> 192, cosine affinities).

    ``freeze_stem`` freezes conv1a, b2, b2_1, b2_2 as the reference; BN freezing is the backbone's
    ``norm="frozen"``. The classifier is ``self.classifier`` (reference ``fc8``) so CONTA's
    :class:`~src.models.conta.ContextInjection` can widen it; reference checkpoints load through
    :meth:`load_weights`.
    """

    first_class_channel = 1  # classifier output of class 1 (channel 0 = background); ReCAM's W_bce rows

    def __init__(
        self,
        backbone: ResNet38d,
        num_classes: int = 20,
        freeze_stem: bool = True,  # specs/seam.md: conv1a, b2, b2_1, b2_2 frozen in the reference
        dropout: float = 0.5,  # reference dropout7 before fc8
        pcm_channels: tuple[int, int] = (64, 128),  # reference f8_3 / f8_4
        lr_mults: Sequence[float] = LR_MULTS,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.lr_mults = tuple(lr_mults)
        fc = backbone.feature_channels
        self.feature_channels = backbone.out_channels
        self.output_stride = backbone.output_stride
        self.dropout7 = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(self.feature_channels, num_classes + 1, 1, bias=False)
        self.f8_3 = nn.Conv2d(fc["conv4"], pcm_channels[0], 1, bias=False)
        self.f8_4 = nn.Conv2d(fc["conv5"], pcm_channels[1], 1, bias=False)
        image_ch = backbone.image_channels
        self.f9 = nn.Conv2d(image_ch + sum(pcm_channels), sum(pcm_channels), 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.kaiming_normal_(self.f8_3.weight)
        nn.init.kaiming_normal_(self.f8_4.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)
        if freeze_stem:
            backbone.freeze(PAPER_FROZEN_BLOCKS)

    def new_layers(self) -> list[nn.Module]:
        return [self.classifier, self.f8_3, self.f8_4, self.f9]

    def cams(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cam, cam_rv) at the feature size (stride 8): raw CAM (B, K+1, h, w) and PCM-refined CAM."""
        image = x
        d = self.backbone.forward_features(self.inject_input(x, context))
        f = self.inject_feature(self.dropout7(d["conv6"]), context)
        cam = self.classifier(f)
        with torch.no_grad():
            seed = pcm_seed(cam)
        h, w = cam.shape[-2:]
        f8_3 = F.relu(self.f8_3(d["conv4"].detach()))
        f8_4 = F.relu(self.f8_4(d["conv5"].detach()))
        x_s = F.interpolate(image[:, : self.backbone.image_channels], (h, w), mode="bilinear",
                            align_corners=True)
        return cam, self.pcm(seed, torch.cat([x_s, f8_3, f8_4], 1))

    def features(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The classifier's input (B, C, h, w): conv6 features after dropout7, CONTA's prior appended when
        given (what :meth:`cams` feeds ``self.classifier``; ReCAM's f)."""
        d = self.backbone.forward_features(self.inject_input(x, context))
        return self.inject_feature(self.dropout7(d["conv6"]), context)

    def seed_cams(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The maps the seeds are made of (``infer_SEAM.py``): the PCM-refined CAMs of the foreground
        classes (channel 0, the background, is never read at inference), at the feature size. Their ReLU in
        the seed merge is a no-op: the PCM output is a non-negative combination of the non-negative seed.
        The reference's way up (to the input size with align_corners=True as :meth:`forward`, then to the
        image size) is the seed merge's ``upsample: via_input`` (conf/seeds/seam.yaml)."""
        return self.cams(x, context)[1][:, 1:]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cam, cam_rv), both upsampled to the input size (bilinear, align_corners=True) as the reference."""
        cam, cam_rv = self.cams(x, context)
        size = x.shape[-2:]
        return (F.interpolate(cam, size, mode="bilinear", align_corners=True),
                F.interpolate(cam_rv, size, mode="bilinear", align_corners=True))

    def pcm(self, cam: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Pixel correlation module: cam (B, K, h', w') refined with the affinities of ``f`` (B, 195, h, w).

        A CAM of another size is first resized to (h, w) (bilinear, align_corners=True). With f9(f)
        L2-normalised per position (norm + 1e-5), a_ij = ReLU(f_i . f_j), and
        cam_rv[:, j] = sum_i cam[:, i] a_ij / (sum_i a_ij + 1e-5).
        """
        n, _, h, w = f.shape
        if cam.shape[-2:] != (h, w):
            cam = F.interpolate(cam, (h, w), mode="bilinear", align_corners=True)
        cam = cam.reshape(n, -1, h * w)
        f = self.f9(f).reshape(n, -1, h * w)
        f = f / (torch.norm(f, dim=1, keepdim=True) + EPS)
        aff = F.relu(f.transpose(1, 2) @ f)
        aff = aff / (aff.sum(dim=1, keepdim=True) + EPS)
        return (cam @ aff).reshape(n, -1, h, w)

    def param_groups(self) -> list[ParamGroup]:
        """Reference groups: backbone weights 1x / biases 2x (no wd), new layers (classifier, PCM) 10x / 20x
        (see :func:`~src.models.resnet38d.split_param_groups`)."""
        return split_param_groups(self.backbone, self.new_layers(), self.lr_mults)

    def load_weights(self, path: str | Path) -> None:
        """Load a whole SEAM state strictly: ours, or a reference ``resnet38_SEAM.pth`` (top-level backbone
        keys, ``fc8``). ImageNet backbone files go to ``self.backbone.load_weights``."""
        state = from_reference_keys(read_state_dict(path), {"fc8": "classifier"})
        load_state_strict(self, state, source=str(path))


def pcm_seed(cam: torch.Tensor) -> torch.Tensor:
    """The CAM the reference feeds to the PCM (no grad): ReLU, divided by the per-(image, class) spatial
    max (+1e-5) after subtracting 1e-5, background = 1 - max foreground, foreground kept only where it is
    the maximal foreground class."""
    cam = F.relu(cam.detach())
    peak = cam.flatten(2).max(-1)[0][..., None, None] + EPS
    cam = F.relu(cam - EPS) / peak
    fg = cam[:, 1:]
    fg_max = fg.max(1, keepdim=True)[0]
    return torch.cat([1 - fg_max, torch.where(fg < fg_max, torch.zeros_like(fg), fg)], 1)
