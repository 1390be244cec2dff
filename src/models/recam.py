"""ReCAM, class re-activation maps (Chen et al., CVPR 2022; ../shared/specs/debias.md): the trained
classifier fine-tuned with a softmax cross-entropy on class-specific features, so one feature region can
no longer raise two co-occurring classes at once; its CAM uses both classifiers' weights.

With f the classifier's last feature map and W_bce its 1x1 classifier (foreground rows):

* cam_k = ReLU(W_bce,k . f) / (spatial max + 1e-5), f_k = spatial mean of (cam_k * f)   (class features)
* L_sce = softmax cross-entropy of W_sce f_k with target k over the image's positive classes, averaged per
  image, summed over the batch and divided by the batch size (images without a class add 0), as the
  reference's ``Class_Predictor``; W_sce is a new 1x1 conv without bias. Loss = BCE + lambda L_sce.
* seed_cams = ReLU(conv(f, W_sce * W_bce)) (element-wise product of the two weights), so the seeds stage
  turns them into seeds with its usual multi-scale + flip merge and per-class normalisation.

The wrapper works for any classifier net with ``features(x, context)`` (the last feature map, CONTA's
prior appended when given), a bias-free 1x1 ``classifier`` conv, ``num_classes``, ``output_stride``,
``feature_channels`` and ``first_class_channel`` (the classifier output of class 1: 0 for IRNet's CAM net,
1 for SEAM, whose channel 0 is the background).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.ops.optim import ParamGroup

EPS = 1e-5  # the reference's epsilon of the CAM normalisation


def class_features(f: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    """f_k (B, K, C): spatial mean of cam_k * f, with cam_k = ReLU(cams_k) / (its spatial max + 1e-5)."""
    norm = F.relu(cams)
    norm = norm / (norm.amax(dim=(2, 3), keepdim=True) + EPS)
    return torch.einsum("bkhw,bchw->bkc", norm, f) / (f.shape[2] * f.shape[3])


def sce_loss(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_sce: ``class_logits`` (B, K, K) = W_sce f_k for every class k, ``labels`` (B, K) multi-hot; the
    cross-entropy of row k with target k, over the positive classes of each image (module docstring)."""
    b, k, _ = class_logits.shape
    targets = torch.arange(k, device=class_logits.device).repeat(b)
    ce = F.cross_entropy(class_logits.reshape(b * k, k), targets, reduction="none").view(b, k)
    positive = (labels > 0).to(ce.dtype)
    per_image = (ce * positive).sum(1) / positive.sum(1).clamp_min(1.0)
    return per_image.sum() / b


class ReCAM(nn.Module):
    """The trained classifier ``net`` plus W_sce (module docstring). ``net_lr_mult``: the lr multiple of the
    classifier's own weights (backbone and W_bce; the reference: 0.1 x W_sce's lr)."""

    def __init__(self, net: nn.Module, net_lr_mult: float) -> None:
        super().__init__()
        for attr in ("features", "classifier", "num_classes", "output_stride", "feature_channels",
                     "first_class_channel"):
            if not hasattr(net, attr):
                raise TypeError(f"ReCAM needs a classifier net with '{attr}'; {type(net).__name__} has none")
        if net.classifier.bias is not None:
            raise ValueError(f"ReCAM needs a classifier without bias (W_bce); {type(net).__name__}'s has one "
                             "(classifier_bias: false)")
        self.net, self.net_lr_mult = net, float(net_lr_mult)
        self.num_classes, self.output_stride = net.num_classes, net.output_stride
        self.sce = nn.Conv2d(net.feature_channels, net.num_classes, 1, bias=False)

    @property
    def feature_channels(self) -> int:
        return self.net.feature_channels

    def bce_weight(self) -> torch.Tensor:
        """W_bce (K, C, 1, 1): the classifier's foreground rows."""
        first = self.net.first_class_channel
        return self.net.classifier.weight[first:first + self.num_classes]

    def cam_weight(self) -> torch.Tensor:
        """W_sce * W_bce (K, C, 1, 1), the weight of ReCAM's CAM."""
        return self.sce.weight * self.bce_weight()

    def class_features(self, x: torch.Tensor, context: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, K) = GAP of W_bce f, the BCE's input; class features f_k (B, K, C))."""
        f = self.net.features(x, context)
        cams = F.conv2d(f, self.bce_weight())
        return cams.mean(dim=(2, 3)), class_features(f, cams)

    def sce_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """W_sce f_k (B, K, K): row k = the class scores of class k's feature."""
        return feats @ self.sce.weight.flatten(1).t()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Image-level logits (B, K) of the fine-tuned classifier (validation mAP)."""
        return F.conv2d(self.net.features(x, context), self.bce_weight()).mean(dim=(2, 3))

    def seed_cams(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """ReCAM's maps: ReLU(conv(f, W_sce * W_bce)) (B, K, h, w)."""
        return F.relu(F.conv2d(self.net.features(x, context), self.cam_weight()))

    def enable_context(self, inject: str = "feature") -> None:
        """CONTA's prior on the wrapped net; W_sce gets the same extra zero-initialised input channel."""
        self.net.enable_context(inject)
        extra = self.net.feature_channels - self.sce.in_channels
        if extra > 0:
            old = self.sce
            new = nn.Conv2d(old.in_channels + extra, old.out_channels, 1, bias=False)
            new = new.to(old.weight.device, old.weight.dtype)
            with torch.no_grad():
                new.weight.zero_()
                new.weight[:, : old.in_channels] = old.weight
            self.sce = new

    def param_groups(self) -> list[ParamGroup]:
        classifier = set(map(id, self.net.classifier.parameters()))
        return [
            ParamGroup([p for p in self.net.parameters() if id(p) not in classifier], self.net_lr_mult,
                       name="backbone"),
            ParamGroup(self.net.classifier.parameters(), self.net_lr_mult, name="bce_classifier"),
            ParamGroup(self.sce.parameters(), 1.0, name="sce_classifier"),
        ]
